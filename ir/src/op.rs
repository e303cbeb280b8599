//! The op set of the tensor IR, the scalar semantics of its elementwise ops,
//! and type inference (which doubles as validation of a graph read from disk).

use super::spec::{KlEstimator, PolicyLoss, RatioLevel};
use super::types::{numel, DType, Scalar, Shape, TensorType};
use num_traits::Float;
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// Elementwise unary float ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    Silu,
    Abs,
    Sign,
    Recip,
    Sin,
    Cos,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 13] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Abs,
        UnaryOp::Sign,
        UnaryOp::Recip,
        UnaryOp::Sin,
        UnaryOp::Cos,
    ];

    /// The reference semantics of the op on one element.
    #[inline]
    pub fn apply<T: Float>(self, x: T) -> T {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => x.sqrt().recip(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => sigmoid(x),
            UnaryOp::Silu => x * sigmoid(x),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sign => {
                if x > T::zero() {
                    T::one()
                } else if x < T::zero() {
                    -T::one()
                } else {
                    x // keeps 0, -0 and NaN
                }
            }
            UnaryOp::Recip => x.recip(),
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Silu => "silu",
            UnaryOp::Abs => "abs",
            UnaryOp::Sign => "sign",
            UnaryOp::Recip => "recip",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
        }
    }
}

/// Clamp of one element to `[lo, hi]`; NaN stays NaN.
#[inline]
pub fn clamp_value<T: Float>(x: T, lo: T, hi: T) -> T {
    if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    }
}

/// Numerically stable logistic function: `1 / (1 + e^-x)` for `x ≥ 0`,
/// `e^x / (1 + e^x)` below. Both branches are computed from the one
/// exponential `e^-|x|` and the result selected, so the loop over a tensor
/// has no data-dependent branch; the values are those of the two-branch
/// form bit for bit (`-|x|` is `-x` for `x ≥ 0` and `x` below, NaN stays
/// NaN).
#[inline]
fn sigmoid<T: Float>(x: T) -> T {
    let e = (-x.abs()).exp();
    let d = T::one() + e;
    let (hi, lo) = (T::one() / d, e / d);
    if x >= T::zero() {
        hi
    } else {
        lo
    }
}

/// Elementwise binary float ops (operands of identical type; broadcasting
/// is an explicit `broadcast` op).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 7] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
    ];

    #[inline]
    pub fn apply<T: Float>(self, a: T, b: T) -> T {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            // NaN-propagating, and `a` on ties (the side the VJP credits).
            BinaryOp::Max => {
                if a.is_nan() || a >= b {
                    a
                } else {
                    b
                }
            }
            BinaryOp::Min => {
                if a.is_nan() || a <= b {
                    a
                } else {
                    b
                }
            }
            BinaryOp::Pow => a.powf(b),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Pow => "pow",
        }
    }
}

/// Elementwise comparisons; the result has dtype `bool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CompareOp {
    pub const ALL: [CompareOp; 6] = [
        CompareOp::Lt,
        CompareOp::Le,
        CompareOp::Gt,
        CompareOp::Ge,
        CompareOp::Eq,
        CompareOp::Ne,
    ];

    #[inline]
    pub fn apply<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            CompareOp::Lt => a < b,
            CompareOp::Le => a <= b,
            CompareOp::Gt => a > b,
            CompareOp::Ge => a >= b,
            CompareOp::Eq => a == b,
            CompareOp::Ne => a != b,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
        }
    }
}

/// Which operand of a causal attention a gradient is taken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttentionOperand {
    Q,
    K,
    V,
}

impl AttentionOperand {
    pub const ALL: [AttentionOperand; 3] = [
        AttentionOperand::Q,
        AttentionOperand::K,
        AttentionOperand::V,
    ];

    /// Operand slot of `CausalAttention` (q 0, k 1, v 2).
    pub fn slot(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            AttentionOperand::Q => "q",
            AttentionOperand::K => "k",
            AttentionOperand::V => "v",
        }
    }
}

/// Which operand of a linear log-prob a gradient is taken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogprobOperand {
    /// The hidden states `h`.
    Hidden,
    /// The output projection `w`.
    Weight,
}

impl LogprobOperand {
    /// Operand slot of `LinearLogprob` (h 0, w 1).
    pub fn slot(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            LogprobOperand::Hidden => "h",
            LogprobOperand::Weight => "w",
        }
    }
}

/// Which operand of an RMSNorm a gradient is taken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NormOperand {
    /// The normalised values `x`.
    Input,
    /// The per-feature gain `w`.
    Weight,
}

impl NormOperand {
    /// Operand slot of `RmsNorm` (x 0, w 1).
    pub fn slot(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            NormOperand::Input => "x",
            NormOperand::Weight => "w",
        }
    }
}

/// An optimiser's update rule with its hyperparameters (PyTorch semantics;
/// see `Op::OptimStep`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepRule {
    /// `θ' = θ − lr g`.
    Sgd { lr: Scalar },
    /// PyTorch SGD with momentum, no dampening or Nesterov: `b' = μ b + g`,
    /// `θ' = θ − lr b'`.
    Momentum { lr: Scalar, mu: Scalar },
    /// AdamW, bias-corrected, decoupled weight decay: `m' = β1 m + (1 − β1)
    /// g`, `v' = β2 v + (1 − β2) g²`, `D = lr / ((√(v' / c2) + eps) c1)` with
    /// `c1 = 1 − β1^t`, `c2 = 1 − β2^t`, `θ' = (1 − lr wd) θ − D ∘ m'`.
    AdamW {
        lr: Scalar,
        beta1: Scalar,
        beta2: Scalar,
        eps: Scalar,
        weight_decay: Scalar,
    },
}

impl StepRule {
    pub fn name(self) -> &'static str {
        match self {
            StepRule::Sgd { .. } => "sgd",
            StepRule::Momentum { .. } => "momentum",
            StepRule::AdamW { .. } => "adamw",
        }
    }

    /// Operands of the rule's step: θ, g, the state buffers, and for AdamW
    /// the step count.
    pub fn arity(self) -> usize {
        match self {
            StepRule::Sgd { .. } => 2,
            StepRule::Momentum { .. } => 3,
            StepRule::AdamW { .. } => 5,
        }
    }

    /// The factor AdamW's decoupled weight decay scales θ by, `1 − lr·wd`;
    /// `None` when the step does not decay θ (no weight decay, or another
    /// rule).
    pub fn decay(self) -> Option<f64> {
        match self {
            StepRule::AdamW {
                lr, weight_decay, ..
            } if weight_decay.get() != 0.0 => Some(1.0 - lr.get() * weight_decay.get()),
            _ => None,
        }
    }

    /// The values one step gives, in kernel output order.
    pub fn outputs(self) -> &'static [StepOut] {
        match self {
            StepRule::Sgd { .. } => &[StepOut::Param],
            StepRule::Momentum { .. } => &[StepOut::Param, StepOut::MomentumBuffer],
            StepRule::AdamW { .. } => &[
                StepOut::Param,
                StepOut::ExpAvg,
                StepOut::ExpAvgSq,
                StepOut::Precond,
            ],
        }
    }
}

/// A policy loss over per-token log-probs `logπ [B, T]` with response
/// mask `mask [B, T]` (weights, > 0 on response tokens): `L = Σ_bt w_bt
/// ℓ_bt`, with per-token terms `ℓ` and weights `w` from the aggregation
/// (see `Op::TokenLoss`; semantics: docs/semantics.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenLoss {
    /// `ℓ = −logπ`, token mean: `L = −Σ mask · logπ / Σ mask`.
    Sft,
    /// The RL policy loss. With `δ_t = logπ − old` and `κ_t = ref − logπ`
    /// (both taken as 0 off the response, so garbage there is dropped):
    ///
    /// - the ratio `ρ = e^δ` per token, or with `ratio: Sequence` GSPO's
    ///   `s = exp(Σ_t mask δ / Σ_t mask)` (1 without response tokens) for
    ///   every token of the sequence;
    /// - `PpoClip`: `ℓ = −min(ρA, clip(ρ, 1 − clip_low, 1 + clip_high) A)`,
    ///   `min` crediting `ρA` on ties; `Cispo`: `ℓ = −sg(clip(ρ, …)) A
    ///   logπ` (logπ as 0 off the response);
    /// - plus `kl_coef ·` the `kl` estimate of κ: k1 `−κ`, k2 `κ²/2`, k3
    ///   `e^κ − κ − 1`.
    ///
    /// `L = Σ w ∘ ℓ` with the weights of `agg`. With the sequence ratio
    /// and PPO's clip, `ℓ` is the sequence's term (GSPO's objective, the
    /// ratio differentiated through) and its derivative with respect to
    /// each token's log-prob is taken as `∂ℓ/∂log s` (the weights are
    /// uniform within a sequence, so `Σ w ∘ ∂ℓ/∂logπ` is still `∂L/∂logπ`).
    Grpo {
        clip_low: Scalar,
        clip_high: Scalar,
        kl_coef: Scalar,
        kl: KlEstimator,
        agg: TokenAgg,
        ratio: RatioLevel,
        surrogate: PolicyLoss,
    },
}

/// The weights `w [B, T]` of a policy loss `L = Σ w ∘ ℓ`, with `n_b` the
/// mask sum of sequence `b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenAgg {
    /// `w = mask / Σ mask` (0 where `Σ mask = 0`: a mean over no token
    /// is 0).
    TokenMean,
    /// `w = mask · [n_b > 0] / (n_b · #{b : n_b > 0})` (0 where no
    /// sequence has a response token).
    SeqMean,
    /// `w = mask / (B · norm)` (Dr. GRPO's constant normaliser).
    SeqSum { norm: Scalar },
}

impl TokenLoss {
    pub fn name(self) -> &'static str {
        match self {
            TokenLoss::Sft => "sft",
            TokenLoss::Grpo { .. } => "grpo",
        }
    }

    /// The policy loss's ratio range `(1 − clip_low, 1 + clip_high)`; None
    /// for SFT.
    pub fn ratio_range(self) -> Option<(f64, f64)> {
        match self {
            TokenLoss::Sft => None,
            TokenLoss::Grpo {
                clip_low,
                clip_high,
                ..
            } => Some((1.0 - clip_low.get(), 1.0 + clip_high.get())),
        }
    }

    /// The KL term's coefficient β (0 without one).
    pub fn kl_coef(self) -> f64 {
        match self {
            TokenLoss::Grpo { kl_coef, .. } if kl_coef.get() > 0.0 => kl_coef.get(),
            _ => 0.0,
        }
    }

    /// The KL term's estimator (k3 for SFT, which has no term).
    pub fn kl_estimator(self) -> KlEstimator {
        match self {
            TokenLoss::Grpo { kl, .. } => kl,
            TokenLoss::Sft => KlEstimator::K3,
        }
    }

    /// Whether the loss reads reference log-probs (GRPO with a KL term:
    /// β > 0, as the pipeline's `kl_coef` says).
    pub fn has_kl(self) -> bool {
        self.kl_coef() > 0.0
    }

    /// Operands of `Op::TokenLoss`: `(logπ, mask)` for SFT, `(logπ, mask,
    /// old, A)` for GRPO, and `ref` after them with a KL term.
    pub fn arity(self) -> usize {
        match self {
            TokenLoss::Sft => 2,
            TokenLoss::Grpo { .. } => 4 + usize::from(self.has_kl()),
        }
    }

    /// The weights' kind (token mean for SFT).
    pub fn agg(self) -> TokenAgg {
        match self {
            TokenLoss::Grpo { agg, .. } => agg,
            TokenLoss::Sft => TokenAgg::TokenMean,
        }
    }

    /// Whether the mean is per sequence first.
    pub fn seq_mean(self) -> bool {
        self.agg() == TokenAgg::SeqMean
    }

    /// Whether the ratio is GSPO's per-sequence one.
    pub fn seq_ratio(self) -> bool {
        matches!(
            self,
            TokenLoss::Grpo {
                ratio: RatioLevel::Sequence,
                ..
            }
        )
    }

    /// Whether the surrogate is CISPO's.
    pub fn cispo(self) -> bool {
        matches!(
            self,
            TokenLoss::Grpo {
                surrogate: PolicyLoss::Cispo,
                ..
            }
        )
    }
}

/// Which value of an optimiser step an `Op::OptimStep` node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepOut {
    /// The updated parameter θ'.
    Param,
    /// Momentum's new buffer b'.
    MomentumBuffer,
    /// AdamW's new first moment m'.
    ExpAvg,
    /// AdamW's new second moment v'.
    ExpAvgSq,
    /// AdamW's per-element step size `D` (θ' = (1 − lr wd) θ − D ∘ m'),
    /// which the bilevel adjoint holds constant.
    Precond,
}

impl StepOut {
    pub fn name(self) -> &'static str {
        match self {
            StepOut::Param => "param",
            StepOut::MomentumBuffer => "momentum_buffer",
            StepOut::ExpAvg => "exp_avg",
            StepOut::ExpAvgSq => "exp_avg_sq",
            StepOut::Precond => "precond",
        }
    }
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceKind {
    Sum,
    Max,
    Mean,
}

impl ReduceKind {
    pub fn name(self) -> &'static str {
        match self {
            ReduceKind::Sum => "sum",
            ReduceKind::Max => "max",
            ReduceKind::Mean => "mean",
        }
    }
}

/// One operation of the IR. Every attribute that decides the result type is
/// part of the op, so `infer_type(op, operand types)` is the whole typing rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// A graph input (parameter or data), bound by name at execution.
    Input {
        name: String,
        ty: TensorType,
    },
    /// A tensor filled with one value.
    Full {
        value: Scalar,
        ty: TensorType,
    },
    /// A tensor given element by element (row-major).
    Literal {
        values: Vec<Scalar>,
        ty: TensorType,
    },
    /// `out[i_0, …] = i_axis`.
    Iota {
        axis: usize,
        ty: TensorType,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    Compare(CompareOp),
    /// `select(cond: bool, a, b)`: `a` where cond, else `b`.
    Select,
    /// Clamp to `[min, max]`.
    Clamp {
        min: Scalar,
        max: Scalar,
    },
    Reduce {
        kind: ReduceKind,
        axes: Vec<usize>,
        keepdim: bool,
    },
    /// `[…, m, k] × […, k, n] → […, m, n]` with equal leading (batch) axes.
    MatMul,
    /// NumPy broadcasting (right-aligned; extents equal or 1) to `shape`.
    Broadcast {
        shape: Shape,
    },
    Reshape {
        shape: Shape,
    },
    /// `out.shape[i] = in.shape[perm[i]]`.
    Permute {
        perm: Vec<usize>,
    },
    /// `in[start[i]..end[i]]` on every axis.
    Slice {
        start: Vec<usize>,
        end: Vec<usize>,
    },
    /// Concatenation of all operands along `axis`.
    Concat {
        axis: usize,
    },
    /// Constant padding: `lo[i]` before and `hi[i]` after axis i.
    Pad {
        lo: Vec<usize>,
        hi: Vec<usize>,
        value: Scalar,
    },
    /// `take_along_axis(x, idx)`: `out[…, j, …] = x[…, idx[…, j, …], …]`
    /// on `axis`; idx (i32) has x's rank and x's extents off `axis`.
    TakeAlongAxis {
        axis: usize,
    },
    /// `scatter_add(base, idx, upd)`: base with `upd[…, j, …]` added at
    /// `[…, idx[…, j, …], …]` on `axis` (the VJP of `TakeAlongAxis`).
    ScatterAdd {
        axis: usize,
    },
    /// Row lookup `gather(table [V, …], ids [S…]) → [S…, …]` (embedding).
    Gather,
    /// `update_slice(base, update, index)`: `base` with `update` (base's
    /// shape with extent 1 on `axis`) written at position `index[0]` (i32
    /// `[1]`) along `axis`; an index outside the axis leaves `base` as it
    /// is. A decode step's cache write: a device executor writes the slice
    /// into `base`'s buffer when the caller donates it.
    UpdateSlice {
        axis: usize,
    },
    /// `scatter_add_rows(ids [S…], upd [S…, …]) → [rows, …]`, rows summed
    /// by id (the VJP of `Gather`).
    ScatterAddRows {
        rows: usize,
    },
    /// `one_hot(ids [S…]) → [S…, depth]` of the given float dtype.
    OneHot {
        depth: usize,
        dtype: DType,
    },
    Cast {
        to: DType,
    },
    /// Causal softmax attention `softmax(q kᵀ / √hd + mask) v` of
    /// `q [B, H, T, hd]` over `k, v [B, H_kv, T, hd]`, where the mask
    /// hides the keys after each query and query head h reads key/value
    /// head h / (H / H_kv) (grouped-query attention). The `[T, T]` scores
    /// are not a value of the graph: executors compute them row by row.
    CausalAttention,
    /// Attention of one query position per row over a key/value cache:
    /// `softmax(q kᵀ / √hd) v` of `q [B, H, 1, hd]` over the cache rows
    /// `0..=pos[0]` of `k, v [B, H_kv, L, hd]` (query head h reads cache
    /// head h / (H / H_kv)), with `pos` i32 `[1]` in `0..L`: the decode
    /// step's attention, which reads only the positions written so far.
    CachedAttention,
    /// The gradient of `Σ do ∘ o` for `o = causal_attention(q, k, v)`
    /// with respect to one operand, from operands `(q, k, v, o, do)`: the
    /// backward pass of `CausalAttention`, which recomputes the
    /// probabilities instead of reading stored ones. Its own gradient is
    /// that of the same computation written with ordinary ops.
    CausalAttentionGrad {
        wrt: AttentionOperand,
    },
    /// `log softmax(h wᵀ)[t, targets[t]]` for hidden states `h [N, d]`, an
    /// output projection `w [V, d]` and i32 `targets [N]`: each row's
    /// log-probability of its target under the logits, which are not a
    /// value of the graph (executors compute them a block of rows at a
    /// time). A target outside `0..V` is an error, as in `take_along_axis`.
    LinearLogprob,
    /// The gradient of `Σ_t g[t] · linear_logprob(h, w, targets)[t]` with
    /// respect to `h` or `w`, from operands `(h, w, targets, g)`:
    /// `dh[t] = g[t] (w[y_t] − Σ_v p_tv w[v])`, `dw[v] = Σ_t g[t] (1[y_t =
    /// v] − p_tv) h[t]`, the probabilities recomputed. Its own gradient is
    /// that of the same computation written with ordinary ops.
    LinearLogprobGrad {
        wrt: LogprobOperand,
    },
    /// `−Σ_v p_tv log p_tv` with `p = softmax(h wᵀ)` for `h [N, d]` and
    /// `w [V, d]`: each row's entropy of the distribution the logits give,
    /// computed (like `LinearLogprob`) without the logits as a value.
    LinearEntropy,
    /// The gradient of `Σ_t g[t] · linear_entropy(h, w)[t]` with respect to
    /// `h` or `w`, from operands `(h, w, g)`: with `C = −g ∘ p ∘ (log p +
    /// H)` per row (`H` the row's entropy), `dh = C w`, `dw = Cᵀ h`, the
    /// probabilities recomputed. Its own gradient is that of the same
    /// computation written with ordinary ops.
    LinearEntropyGrad {
        wrt: LogprobOperand,
    },
    /// RMSNorm over the last axis of `x [..., d]` with gain `w [d]`: `y =
    /// x · r · w`, `r = 1 / √(mean(x²) + eps)` per row. Executors compute
    /// `r` on the fly; it is not a value of the graph.
    RmsNorm {
        eps: Scalar,
    },
    /// The gradient of `Σ dy ∘ rms_norm(x, w)` with respect to `x` or `w`,
    /// from operands `(x, w, dy)`: `dx = r (dy ∘ w) − x r³ Σ(dy ∘ w ∘ x) /
    /// d` per row, `dw = Σ_rows dy ∘ x · r`, with `r` recomputed. Its own
    /// gradient is that of the same computation written with ordinary ops.
    RmsNormGrad {
        wrt: NormOperand,
        eps: Scalar,
    },
    /// Rotate-half rotary position embedding of `x [..., T, hd]` (`hd`
    /// even, `h = hd / 2`) by tables `cos, sin [T, hd]`: `y = x ∘ cos +
    /// rot(x) ∘ sin` with `rot(x) = [−x[h..], x[..h]]` along the last axis.
    /// `transpose` applies the transposed map, `y = x ∘ cos + rotᵀ(x ∘ sin)`
    /// with `rotᵀ(u) = [u[h..], −u[..h]]`: the op's gradient with respect
    /// to `x` (and the inverse rotation when `sin` has equal halves, as
    /// RoPE's tables do).
    Rope {
        transpose: bool,
    },
    /// One optimiser step on one parameter tensor, from operands `(θ, g,
    /// state…)` of one type — `(θ, g)` for SGD, `(θ, g, b)` for momentum,
    /// `(θ, g, m, v, t)` for AdamW with `t` the step count after this step
    /// (a scalar of θ's dtype) — giving the value `out` (see [`StepRule`]).
    /// The values of one step are sibling nodes with the same operands,
    /// which executors compute together. AdamW's `D` is behind a stop
    /// gradient: the derivative is that of the rule with `D` held constant.
    OptimStep {
        rule: StepRule,
        out: StepOut,
    },
    /// A policy loss (a one-element value of `logπ`'s dtype, shape `[]`)
    /// from operands `(logπ [B, T], mask [B, T], old [B, T], A [B], ref
    /// [B, T])`, as many as `loss.arity()` says (see [`TokenLoss`]). The
    /// per-token terms are not values of the graph: executors compute and
    /// aggregate them in one pass.
    TokenLoss {
        loss: TokenLoss,
    },
    /// `gout · ∂L/∂logπ [B, T]` of `L = token_loss(loss)` from operands
    /// `(loss's operands…, gout)` with `gout` of L's type: the loss's
    /// gradient with respect to the log-probs (zero off the response). Its
    /// own gradient is that of the same computation written with ordinary
    /// ops.
    TokenLossGrad {
        loss: TokenLoss,
    },
    /// Identity whose gradient is zero.
    StopGradient,
    /// Identity that passes ops through unchanged but is never merged or
    /// removed by a pass: two barriers with different tags are different
    /// values to CSE. The memory planner uses it to make a recomputed copy
    /// of a subgraph stay a copy.
    Barrier {
        tag: u32,
    },
    /// The sum of the operand over the processes of a data-parallel run
    /// (every process holds the same result, summed in rank order); the
    /// identity in a single process. Its gradient is the same sum of the
    /// cotangent: each process holds its share of a cotangent, and the
    /// objective is the sum of the processes' objectives (see
    /// docs/semantics.md, "Data parallelism"). No pass folds, merges across
    /// programs or removes it while its result is used.
    AllReduceSum,
}

/// A node's operands or attributes do not fit its op.
#[derive(Debug, Error, Clone, PartialEq)]
#[error("{op}: {message}")]
pub struct TypeError {
    pub op: String,
    pub message: String,
}

impl Op {
    /// Short lower-case name, as printed.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Full { .. } => "full",
            Op::Literal { .. } => "literal",
            Op::Iota { .. } => "iota",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Compare(c) => c.name(),
            Op::Select => "select",
            Op::Clamp { .. } => "clamp",
            Op::Reduce { kind, .. } => match kind {
                ReduceKind::Sum => "reduce_sum",
                ReduceKind::Max => "reduce_max",
                ReduceKind::Mean => "reduce_mean",
            },
            Op::MatMul => "matmul",
            Op::Broadcast { .. } => "broadcast",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Pad { .. } => "pad",
            Op::TakeAlongAxis { .. } => "take_along_axis",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::Gather => "gather",
            Op::UpdateSlice { .. } => "update_slice",
            Op::ScatterAddRows { .. } => "scatter_add_rows",
            Op::OneHot { .. } => "one_hot",
            Op::Cast { .. } => "cast",
            Op::CausalAttention => "causal_attention",
            Op::CachedAttention => "cached_attention",
            Op::LinearLogprob => "linear_logprob",
            Op::LinearLogprobGrad { .. } => "linear_logprob_grad",
            Op::LinearEntropy => "linear_entropy",
            Op::LinearEntropyGrad { .. } => "linear_entropy_grad",
            Op::Rope { .. } => "rope",
            Op::RmsNorm { .. } => "rms_norm",
            Op::RmsNormGrad { .. } => "rms_norm_grad",
            Op::OptimStep { .. } => "optim_step",
            Op::TokenLoss { .. } => "token_loss",
            Op::TokenLossGrad { .. } => "token_loss_grad",
            Op::CausalAttentionGrad { .. } => "causal_attention_grad",
            Op::StopGradient => "stop_gradient",
            Op::Barrier { .. } => "barrier",
            Op::AllReduceSum => "all_reduce_sum",
        }
    }

    /// A permute that swaps the last two axes and keeps the others: the
    /// batched matrix transpose, which matrix products can read through
    /// swapped strides instead.
    pub fn is_matrix_transpose(&self) -> bool {
        match self {
            Op::Permute { perm } => {
                let r = perm.len();
                r >= 2
                    && perm[r - 2] == r - 1
                    && perm[r - 1] == r - 2
                    && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p)
            }
            _ => false,
        }
    }

    /// Elementwise ops: output element i depends only on input elements i.
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Unary(_)
                | Op::Binary(_)
                | Op::Compare(_)
                | Op::Select
                | Op::Clamp { .. }
                | Op::Cast { .. }
                | Op::StopGradient
        )
    }

    /// Ops with no operands.
    pub fn is_source(&self) -> bool {
        matches!(
            self,
            Op::Input { .. } | Op::Full { .. } | Op::Literal { .. } | Op::Iota { .. }
        )
    }

    /// Attributes as printed between brackets (empty when there are none).
    pub fn attrs(&self) -> String {
        fn list(v: &[usize]) -> String {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
        match self {
            Op::Input { name, .. } => format!("\"{name}\""),
            Op::Full { value, .. } => value.to_string(),
            Op::Literal { values, .. } => {
                let shown: Vec<String> = values.iter().take(8).map(|v| v.to_string()).collect();
                let more = if values.len() > 8 { ", …" } else { "" };
                format!("{}{more}", shown.join(", "))
            }
            Op::Iota { axis, .. } => format!("axis={axis}"),
            Op::Clamp { min, max } => format!("{min}, {max}"),
            Op::Reduce { axes, keepdim, .. } => {
                format!(
                    "axes=[{}]{}",
                    list(axes),
                    if *keepdim { ", keepdim" } else { "" }
                )
            }
            Op::Broadcast { shape } | Op::Reshape { shape } => format!("[{}]", list(shape)),
            Op::Permute { perm } => format!("[{}]", list(perm)),
            Op::Slice { start, end } => {
                let r: Vec<String> = start
                    .iter()
                    .zip(end)
                    .map(|(s, e)| format!("{s}:{e}"))
                    .collect();
                r.join(",")
            }
            Op::Concat { axis }
            | Op::TakeAlongAxis { axis }
            | Op::ScatterAdd { axis }
            | Op::UpdateSlice { axis } => {
                format!("axis={axis}")
            }
            Op::Pad { lo, hi, value } => format!("lo=[{}], hi=[{}], {value}", list(lo), list(hi)),
            Op::ScatterAddRows { rows } => format!("rows={rows}"),
            Op::OneHot { depth, dtype } => format!("depth={depth}, {dtype}"),
            Op::Cast { to } => to.to_string(),
            Op::Barrier { tag } => format!("tag={tag}"),
            Op::CausalAttentionGrad { wrt } => format!("wrt={}", wrt.name()),
            Op::LinearLogprobGrad { wrt } | Op::LinearEntropyGrad { wrt } => {
                format!("wrt={}", wrt.name())
            }
            Op::Rope { transpose: true } => "transpose".into(),
            Op::RmsNorm { eps } => format!("eps={}", eps.get()),
            Op::RmsNormGrad { wrt, eps } => format!("wrt={}, eps={}", wrt.name(), eps.get()),
            Op::OptimStep { rule, out } => {
                let hyper = match rule {
                    StepRule::Sgd { lr } => format!("lr={lr}"),
                    StepRule::Momentum { lr, mu } => format!("lr={lr}, mu={mu}"),
                    StepRule::AdamW {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                    } => format!(
                        "lr={lr}, beta1={beta1}, beta2={beta2}, eps={eps}, weight_decay={weight_decay}"
                    ),
                };
                format!("{}, {hyper}, out={}", rule.name(), out.name())
            }
            Op::TokenLoss { loss } | Op::TokenLossGrad { loss } => match loss {
                TokenLoss::Sft => "sft".into(),
                TokenLoss::Grpo {
                    clip_low,
                    clip_high,
                    kl_coef,
                    kl,
                    agg,
                    ratio,
                    surrogate,
                } => {
                    let agg = match agg {
                        TokenAgg::TokenMean => "token_mean".to_string(),
                        TokenAgg::SeqMean => "seq_mean".to_string(),
                        TokenAgg::SeqSum { norm } => format!("seq_sum/{norm}"),
                    };
                    let mut s = format!(
                        "grpo, clip_low={clip_low}, clip_high={clip_high}, kl_coef={kl_coef}, {agg}"
                    );
                    if *kl != KlEstimator::K3 {
                        s += &format!(", kl={}", kl.name());
                    }
                    if *ratio == RatioLevel::Sequence {
                        s += ", ratio=sequence";
                    }
                    if *surrogate == PolicyLoss::Cispo {
                        s += ", cispo";
                    }
                    s
                }
            },
            _ => String::new(),
        }
    }

    /// The result type of this op applied to operands of the given types,
    /// or why the operands do not fit.
    pub fn infer_type(&self, inputs: &[&TensorType]) -> Result<TensorType, TypeError> {
        let err = |message: String| TypeError {
            op: self.name().to_string(),
            message,
        };
        let arity = |n: usize| -> Result<(), TypeError> {
            if inputs.len() == n {
                Ok(())
            } else {
                Err(err(format!("expects {n} operand(s), got {}", inputs.len())))
            }
        };
        let float = |t: &TensorType, what: &str| -> Result<(), TypeError> {
            if t.dtype.is_float() {
                Ok(())
            } else {
                Err(err(format!("{what} must be f32, f64 or bf16, got {t}")))
            }
        };
        let axis_ok = |axis: usize, rank: usize| -> Result<(), TypeError> {
            if axis < rank {
                Ok(())
            } else {
                Err(err(format!("axis {axis} out of range for rank {rank}")))
            }
        };
        match self {
            Op::Input { ty, .. } | Op::Full { ty, .. } => {
                arity(0)?;
                Ok(ty.clone())
            }
            Op::Literal { values, ty } => {
                arity(0)?;
                if values.len() != ty.numel() {
                    return Err(err(format!("{} values for type {ty}", values.len())));
                }
                Ok(ty.clone())
            }
            Op::Iota { axis, ty } => {
                arity(0)?;
                axis_ok(*axis, ty.rank())?;
                if ty.dtype == DType::Bool {
                    return Err(err("iota cannot be bool".into()));
                }
                Ok(ty.clone())
            }
            Op::Unary(_) | Op::Clamp { .. } => {
                arity(1)?;
                float(inputs[0], "operand")?;
                Ok(inputs[0].clone())
            }
            Op::Binary(_) => {
                arity(2)?;
                float(inputs[0], "lhs")?;
                if inputs[0] != inputs[1] {
                    return Err(err(format!(
                        "operand types differ: {} vs {}",
                        inputs[0], inputs[1]
                    )));
                }
                Ok(inputs[0].clone())
            }
            Op::Compare(_) => {
                arity(2)?;
                if inputs[0] != inputs[1] {
                    return Err(err(format!(
                        "operand types differ: {} vs {}",
                        inputs[0], inputs[1]
                    )));
                }
                Ok(TensorType::new(DType::Bool, inputs[0].shape.clone()))
            }
            Op::Select => {
                arity(3)?;
                if inputs[0].dtype != DType::Bool || inputs[0].shape != inputs[1].shape {
                    return Err(err(format!(
                        "condition must be bool with the shape of the branches, got {}",
                        inputs[0]
                    )));
                }
                if inputs[1] != inputs[2] {
                    return Err(err(format!(
                        "branch types differ: {} vs {}",
                        inputs[1], inputs[2]
                    )));
                }
                Ok(inputs[1].clone())
            }
            Op::Reduce { axes, keepdim, .. } => {
                arity(1)?;
                float(inputs[0], "operand")?;
                let r = inputs[0].rank();
                for (i, &a) in axes.iter().enumerate() {
                    axis_ok(a, r)?;
                    if axes[..i].contains(&a) {
                        return Err(err(format!("axis {a} repeated")));
                    }
                }
                let mut shape = Vec::new();
                for (i, &d) in inputs[0].shape.iter().enumerate() {
                    if axes.contains(&i) {
                        if *keepdim {
                            shape.push(1);
                        }
                    } else {
                        shape.push(d);
                    }
                }
                Ok(TensorType::new(inputs[0].dtype, shape))
            }
            Op::MatMul => {
                arity(2)?;
                let (a, b) = (inputs[0], inputs[1]);
                float(a, "lhs")?;
                if a.dtype != b.dtype {
                    return Err(err(format!("dtypes differ: {a} vs {b}")));
                }
                if a.rank() < 2 || a.rank() != b.rank() {
                    return Err(err(format!(
                        "needs operands of equal rank ≥ 2, got {a} and {b}"
                    )));
                }
                let r = a.rank();
                if a.shape[..r - 2] != b.shape[..r - 2] || a.shape[r - 1] != b.shape[r - 2] {
                    return Err(err(format!("shapes do not chain: {a} × {b}")));
                }
                let mut shape = a.shape[..r - 1].to_vec();
                shape.push(b.shape[r - 1]);
                Ok(TensorType::new(a.dtype, shape))
            }
            Op::Broadcast { shape } => {
                arity(1)?;
                let s = &inputs[0].shape;
                if s.len() > shape.len() {
                    return Err(err(format!(
                        "cannot broadcast {} to rank {}",
                        inputs[0],
                        shape.len()
                    )));
                }
                let off = shape.len() - s.len();
                for (i, &d) in s.iter().enumerate() {
                    if d != 1 && d != shape[off + i] {
                        return Err(err(format!(
                            "cannot broadcast {} to {:?}: axis {i} has extent {d}",
                            inputs[0], shape
                        )));
                    }
                }
                Ok(TensorType::new(inputs[0].dtype, shape.clone()))
            }
            Op::Reshape { shape } => {
                arity(1)?;
                if numel(shape) != inputs[0].numel() {
                    return Err(err(format!("cannot reshape {} to {:?}", inputs[0], shape)));
                }
                Ok(TensorType::new(inputs[0].dtype, shape.clone()))
            }
            Op::Permute { perm } => {
                arity(1)?;
                let r = inputs[0].rank();
                let mut seen = vec![false; r];
                if perm.len() != r {
                    return Err(err(format!("permutation {perm:?} for rank {r}")));
                }
                for &p in perm {
                    if p >= r || seen[p] {
                        return Err(err(format!("{perm:?} is not a permutation of 0..{r}")));
                    }
                    seen[p] = true;
                }
                let shape = perm.iter().map(|&p| inputs[0].shape[p]).collect::<Vec<_>>();
                Ok(TensorType::new(inputs[0].dtype, shape))
            }
            Op::Slice { start, end } => {
                arity(1)?;
                let s = &inputs[0].shape;
                if start.len() != s.len() || end.len() != s.len() {
                    return Err(err(format!(
                        "bounds of rank {} for {}",
                        start.len(),
                        inputs[0]
                    )));
                }
                let mut shape = Vec::with_capacity(s.len());
                for i in 0..s.len() {
                    if start[i] > end[i] || end[i] > s[i] {
                        return Err(err(format!(
                            "axis {i}: {}..{} out of 0..{}",
                            start[i], end[i], s[i]
                        )));
                    }
                    shape.push(end[i] - start[i]);
                }
                Ok(TensorType::new(inputs[0].dtype, shape))
            }
            Op::Concat { axis } => {
                if inputs.is_empty() {
                    return Err(err("needs at least one operand".into()));
                }
                let first = inputs[0];
                axis_ok(*axis, first.rank())?;
                let mut shape = first.shape.clone();
                shape[*axis] = 0;
                for t in inputs {
                    let compatible = t.dtype == first.dtype
                        && t.rank() == first.rank()
                        && (0..t.rank()).all(|i| i == *axis || t.shape[i] == first.shape[i]);
                    if !compatible {
                        return Err(err(format!(
                            "cannot concatenate {t} with {first} on axis {axis}"
                        )));
                    }
                    shape[*axis] += t.shape[*axis];
                }
                Ok(TensorType::new(first.dtype, shape))
            }
            Op::Pad { lo, hi, .. } => {
                arity(1)?;
                let s = &inputs[0].shape;
                if lo.len() != s.len() || hi.len() != s.len() {
                    return Err(err(format!(
                        "padding of rank {} for {}",
                        lo.len(),
                        inputs[0]
                    )));
                }
                let shape = (0..s.len())
                    .map(|i| lo[i] + s[i] + hi[i])
                    .collect::<Vec<_>>();
                Ok(TensorType::new(inputs[0].dtype, shape))
            }
            Op::TakeAlongAxis { axis } => {
                arity(2)?;
                let (x, idx) = (inputs[0], inputs[1]);
                axis_ok(*axis, x.rank())?;
                check_index_like(x, idx, *axis).map_err(err)?;
                Ok(TensorType::new(x.dtype, idx.shape.clone()))
            }
            Op::ScatterAdd { axis } => {
                arity(3)?;
                let (base, idx, upd) = (inputs[0], inputs[1], inputs[2]);
                float(base, "base")?;
                axis_ok(*axis, base.rank())?;
                check_index_like(base, idx, *axis).map_err(err)?;
                if upd.dtype != base.dtype || upd.shape != idx.shape {
                    return Err(err(format!(
                        "updates {upd} must have base's dtype and the index shape {idx}"
                    )));
                }
                Ok(base.clone())
            }
            Op::UpdateSlice { axis } => {
                arity(3)?;
                let (base, upd, index) = (inputs[0], inputs[1], inputs[2]);
                axis_ok(*axis, base.rank())?;
                let mut want = base.shape.clone();
                want[*axis] = 1;
                if upd.dtype != base.dtype || upd.shape != want {
                    return Err(err(format!(
                        "the update {upd} must have base's dtype and shape {want:?} (base {base})"
                    )));
                }
                if index.dtype != DType::I32 || index.shape[..] != [1] {
                    return Err(err(format!("the index must be i32 [1], got {index}")));
                }
                Ok(base.clone())
            }
            Op::Gather => {
                arity(2)?;
                let (table, ids) = (inputs[0], inputs[1]);
                if table.rank() < 1 || ids.dtype != DType::I32 {
                    return Err(err(format!(
                        "needs a table of rank ≥ 1 and i32 ids, got {table} and {ids}"
                    )));
                }
                let mut shape = ids.shape.clone();
                shape.extend_from_slice(&table.shape[1..]);
                Ok(TensorType::new(table.dtype, shape))
            }
            Op::ScatterAddRows { rows } => {
                arity(2)?;
                let (ids, upd) = (inputs[0], inputs[1]);
                float(upd, "updates")?;
                if ids.dtype != DType::I32 || !upd.shape.starts_with(&ids.shape) {
                    return Err(err(format!(
                        "needs i32 ids whose shape prefixes the updates', got {ids} and {upd}"
                    )));
                }
                let mut shape = vec![*rows];
                shape.extend_from_slice(&upd.shape[ids.rank()..]);
                Ok(TensorType::new(upd.dtype, shape))
            }
            Op::OneHot { depth, dtype } => {
                arity(1)?;
                if inputs[0].dtype != DType::I32 || !dtype.is_float() {
                    return Err(err(format!(
                        "needs i32 ids and a float result type, got {} → {dtype}",
                        inputs[0]
                    )));
                }
                let mut shape = inputs[0].shape.clone();
                shape.push(*depth);
                Ok(TensorType::new(*dtype, shape))
            }
            Op::Cast { to } => {
                arity(1)?;
                Ok(TensorType::new(*to, inputs[0].shape.clone()))
            }
            Op::StopGradient | Op::Barrier { .. } => {
                arity(1)?;
                Ok(inputs[0].clone())
            }
            Op::AllReduceSum => {
                arity(1)?;
                float(inputs[0], "the operand")?;
                Ok(inputs[0].clone())
            }
            Op::CausalAttention => {
                arity(3)?;
                check_attention(inputs[0], inputs[1], inputs[2]).map_err(err)?;
                Ok(inputs[0].clone())
            }
            Op::CachedAttention => {
                arity(4)?;
                let (q, k, v, pos) = (inputs[0], inputs[1], inputs[2], inputs[3]);
                let ok = q.dtype.is_float()
                    && q.rank() == 4
                    && q.shape[2] == 1
                    && k == v
                    && k.dtype == q.dtype
                    && k.rank() == 4
                    && k.shape[0] == q.shape[0]
                    && k.shape[3] == q.shape[3]
                    && k.shape[1] > 0
                    && k.shape[2] > 0
                    && q.shape[1].is_multiple_of(k.shape[1]);
                if !ok {
                    return Err(err(format!(
                        "needs float q [B, H, 1, hd] and k, v [B, H_kv, L, hd] of its dtype with H a multiple of H_kv and L ≥ 1, got {q}, {k}, {v}"
                    )));
                }
                if pos.dtype != DType::I32 || pos.shape[..] != [1] {
                    return Err(err(format!("the position must be i32 [1], got {pos}")));
                }
                Ok(q.clone())
            }
            Op::LinearLogprob => {
                arity(3)?;
                check_logprob(inputs[0], inputs[1], inputs[2]).map_err(err)?;
                Ok(TensorType::new(
                    inputs[0].dtype.accumulator(),
                    vec![inputs[0].shape[0]],
                ))
            }
            Op::LinearLogprobGrad { wrt } => {
                arity(4)?;
                let (h, g) = (inputs[0], inputs[3]);
                check_logprob(h, inputs[1], inputs[2]).map_err(err)?;
                if g.dtype != h.dtype.accumulator() || g.shape[..] != h.shape[..1] {
                    return Err(err(format!(
                        "`g` {g} must be one {} per row of h {h}",
                        h.dtype.accumulator()
                    )));
                }
                Ok(inputs[wrt.slot()].clone())
            }
            Op::LinearEntropy => {
                arity(2)?;
                check_entropy(inputs[0], inputs[1]).map_err(err)?;
                Ok(TensorType::new(
                    inputs[0].dtype.accumulator(),
                    vec![inputs[0].shape[0]],
                ))
            }
            Op::LinearEntropyGrad { wrt } => {
                arity(3)?;
                let (h, g) = (inputs[0], inputs[2]);
                check_entropy(h, inputs[1]).map_err(err)?;
                if g.dtype != h.dtype.accumulator() || g.shape[..] != h.shape[..1] {
                    return Err(err(format!(
                        "`g` {g} must be one {} per row of h {h}",
                        h.dtype.accumulator()
                    )));
                }
                Ok(inputs[wrt.slot()].clone())
            }
            Op::RmsNorm { .. } => {
                arity(2)?;
                check_norm(inputs[0], inputs[1]).map_err(err)?;
                Ok(inputs[0].clone())
            }
            Op::RmsNormGrad { wrt, .. } => {
                arity(3)?;
                let (x, dy) = (inputs[0], inputs[2]);
                check_norm(x, inputs[1]).map_err(err)?;
                if dy != x {
                    return Err(err(format!("`dy` {dy} must have x's type {x}")));
                }
                Ok(inputs[wrt.slot()].clone())
            }
            Op::Rope { .. } => {
                arity(3)?;
                check_rope(inputs[0], inputs[1], inputs[2]).map_err(err)?;
                Ok(inputs[0].clone())
            }
            Op::OptimStep { rule, out } => {
                arity(rule.arity())?;
                if !rule.outputs().contains(out) {
                    return Err(err(format!(
                        "{} has no `{}` value",
                        rule.name(),
                        out.name()
                    )));
                }
                let p = inputs[0];
                float(p, "the parameter")?;
                let tensors = match rule {
                    StepRule::AdamW { .. } => 4,
                    _ => rule.arity(),
                };
                for (i, t) in inputs[1..tensors].iter().enumerate() {
                    if *t != p {
                        return Err(err(format!(
                            "operand {} {t} must have the parameter's type {p}",
                            i + 1
                        )));
                    }
                }
                if let StepRule::AdamW { .. } = rule {
                    let t = inputs[4];
                    if t.dtype != p.dtype || t.rank() != 0 {
                        return Err(err(format!(
                            "the step count must be a scalar of the parameter's dtype, got {t}"
                        )));
                    }
                }
                Ok(p.clone())
            }
            Op::TokenLoss { loss } => {
                arity(loss.arity())?;
                check_token_loss(*loss, inputs).map_err(err)?;
                Ok(TensorType::new(inputs[0].dtype, vec![]))
            }
            Op::TokenLossGrad { loss } => {
                arity(loss.arity() + 1)?;
                let (ops, gout) = inputs.split_at(loss.arity());
                check_token_loss(*loss, ops).map_err(err)?;
                let lp = ops[0];
                if gout[0].dtype != lp.dtype || gout[0].rank() != 0 {
                    return Err(err(format!(
                        "`gout` must be a scalar of logπ's dtype, got {}",
                        gout[0]
                    )));
                }
                Ok(lp.clone())
            }
            Op::CausalAttentionGrad { wrt } => {
                arity(5)?;
                let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
                check_attention(q, k, v).map_err(err)?;
                for (name, t) in [("o", inputs[3]), ("do", inputs[4])] {
                    if t != q {
                        return Err(err(format!("`{name}` {t} must have q's type {q}")));
                    }
                }
                Ok(inputs[wrt.slot()].clone())
            }
        }
    }
}

/// Operands of a token loss: float logπ [B, T] (B, T ≥ 1), mask, old and
/// ref of its type, A [B] of its dtype.
fn check_token_loss(loss: TokenLoss, ops: &[&TensorType]) -> Result<(), String> {
    let lp = ops[0];
    if !lp.dtype.is_float() || lp.rank() != 2 || lp.numel() == 0 {
        return Err(format!("logπ must be a non-empty float [B, T], got {lp}"));
    }
    let names = ["mask", "old", "A", "ref"];
    for (i, (t, name)) in ops[1..].iter().zip(names).enumerate() {
        let want = if i == 2 {
            TensorType::new(lp.dtype, vec![lp.shape[0]])
        } else {
            lp.clone()
        };
        if **t != want {
            return Err(format!(
                "{} loss: `{name}` must be {want} for logπ {lp}, got {t}",
                loss.name()
            ));
        }
    }
    Ok(())
}

/// Operands of an RMSNorm: float x [..., d] (d ≥ 1) and w [d] of its dtype.
fn check_norm(x: &TensorType, w: &TensorType) -> Result<(), String> {
    let ok = x.dtype.is_float()
        && x.rank() >= 1
        && x.shape[x.rank() - 1] > 0
        && w.dtype == x.dtype
        && w.shape[..] == x.shape[x.rank() - 1..];
    if ok {
        Ok(())
    } else {
        Err(format!(
            "needs float x [..., d] with d ≥ 1 and w [d] of its dtype, got x {x}, w {w}"
        ))
    }
}

/// Operands of a rotary embedding: float x [..., T, hd] with hd even and
/// tables cos, sin [T, hd] of its dtype.
fn check_rope(x: &TensorType, cos: &TensorType, sin: &TensorType) -> Result<(), String> {
    let r = x.rank();
    let ok = x.dtype.is_float()
        && r >= 2
        && x.shape[r - 1].is_multiple_of(2)
        && [cos, sin]
            .iter()
            .all(|t| t.dtype == x.dtype && t.shape[..] == x.shape[r - 2..]);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "needs float x [..., T, hd] with hd even and cos, sin [T, hd] of its dtype, got x {x}, cos {cos}, sin {sin}"
        ))
    }
}

/// Operands of a linear log-prob: float h [N, d], w [V, d] of its dtype
/// and i32 targets [N].
fn check_logprob(h: &TensorType, w: &TensorType, targets: &TensorType) -> Result<(), String> {
    let ok = check_entropy(h, w).is_ok()
        && targets.dtype == DType::I32
        && targets.shape[..] == h.shape[..1];
    if ok {
        Ok(())
    } else {
        Err(format!(
            "needs float h [N, d], w [V, d] of its dtype (d, V ≥ 1) and i32 targets [N], got {h}, {w}, {targets}"
        ))
    }
}

/// Operands of a linear entropy: float h [N, d] and w [V, d] of its dtype.
fn check_entropy(h: &TensorType, w: &TensorType) -> Result<(), String> {
    let ok = h.dtype.is_float()
        && h.rank() == 2
        && w.rank() == 2
        && w.dtype == h.dtype
        && w.shape[1] == h.shape[1]
        && h.shape[1] > 0
        && w.shape[0] > 0;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "needs float h [N, d] and w [V, d] of its dtype (d, V ≥ 1), got {h}, {w}"
        ))
    }
}

/// Operands of a causal attention: float q [B, H, T, hd] and k, v
/// [B, H_kv, T, hd] of q's dtype, with H a multiple of H_kv.
fn check_attention(q: &TensorType, k: &TensorType, v: &TensorType) -> Result<(), String> {
    let ok = q.dtype.is_float()
        && q.rank() == 4
        && k == v
        && k.dtype == q.dtype
        && k.rank() == 4
        && k.shape[0] == q.shape[0]
        && k.shape[2] == q.shape[2]
        && k.shape[3] == q.shape[3]
        && k.shape[1] > 0
        && q.shape[1].is_multiple_of(k.shape[1]);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "needs float q [B, H, T, hd] and k, v [B, H_kv, T, hd] of its dtype with H a multiple of H_kv, got {q}, {k}, {v}"
        ))
    }
}

/// `idx` must be i32 with `x`'s rank and `x`'s extents on every axis but `axis`.
fn check_index_like(x: &TensorType, idx: &TensorType, axis: usize) -> Result<(), String> {
    let ok = idx.dtype == DType::I32
        && idx.rank() == x.rank()
        && (0..x.rank()).all(|i| i == axis || idx.shape[i] == x.shape[i]);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "index must be i32 with the extents of {x} off axis {axis}, got {idx}"
        ))
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.attrs();
        if a.is_empty() {
            f.write_str(self.name())
        } else {
            write!(f, "{}[{a}]", self.name())
        }
    }
}

#[cfg(test)]
mod sigmoid_tests {
    use super::*;

    /// The two-branch logistic function the branch-free one replaced.
    fn two_branch<T: Float>(x: T) -> T {
        if x >= T::zero() {
            T::one() / (T::one() + (-x).exp())
        } else {
            let e = x.exp();
            e / (T::one() + e)
        }
    }

    fn probes() -> Vec<f64> {
        let mut v = vec![
            0.0, -0.0, 1.0, -1.0, 88.7, -88.7, 103.9, -103.9, 745.2, -745.2,
        ];
        v.extend([
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
        ]);
        // A dense sweep of [-40, 40] on an irrational step, and tiny values.
        v.extend((0..200_000).map(|i| -40.0 + i as f64 * 4.000_000_123e-4));
        v.extend((0..1000).map(|i| (i as f64 - 500.0) * 1e-9));
        v
    }

    #[test]
    fn branch_free_sigmoid_equals_the_two_branch_form_bit_for_bit() {
        for x in probes() {
            let (a, b) = (sigmoid(x), two_branch(x));
            assert_eq!(a.to_bits(), b.to_bits(), "f64 sigmoid({x:e})");
            let (a, b) = (UnaryOp::Silu.apply(x), x * two_branch(x));
            assert_eq!(a.to_bits(), b.to_bits(), "f64 silu({x:e})");
            let x = x as f32;
            let (a, b) = (sigmoid(x), two_branch(x));
            assert_eq!(a.to_bits(), b.to_bits(), "f32 sigmoid({x:e})");
        }
        assert!(sigmoid(f64::NAN).is_nan() && two_branch(f64::NAN).is_nan());
        assert!(sigmoid(f32::NAN).is_nan());
    }
}
