//! Bilevel lowering: the BRIDGE meta-step (and the baselines, which are the
//! same machinery with parts switched off) as one IR graph.
//!
//! Per meta-step (docs/semantics.md §6): K lower steps `θ ← OptLower(θ, ∇θ L_low)`,
//! K shadow steps `θ̂ ← OptLower(θ̂, ∇θ̂ L_RL)`, then the hypergradient h of
//! `L_up = (1−λ) L_SFT(θ_K, w) + λ [L_RL(θ_K, w) − L_RL(θ̂_K, w)]` and the
//! upper update `w ← OptUpper(w, h)`.
//!
//! Every lower step's loss is built on `stop_gradient(θ_k)`, so autodiff
//! never differentiates through the unrolled loop by itself; the
//! hypergradient is formed by an explicit adjoint recurrence over the last T
//! steps (docs/semantics.md §7.2), whose second-order products ∂²L/∂θ∂θ·u
//! and ∂²L/∂w∂θ·u come either from autodiff applied to the step's gradient
//! nodes (`truncated`) or from central differences of first-order gradients
//! (`finite_difference`). For AdamW the preconditioner is frozen: the
//! adjoint treats 1/(√v̂ + ε) as a constant.
//!
//! Graph interface (names):
//! - inputs: θ by HF name; w by PEFT name; `shadow.<θ>` (persistent shadow);
//!   optimiser state `opt.{lower,shadow,upper}.{momentum_buffer,exp_avg,exp_avg_sq}.<param>`
//!   and `opt.{lower,shadow,upper}.step` (AdamW step count, a scalar);
//!   batches `step{k}.sft.{input_ids,loss_mask}`,
//!   `step{k}.rl.{input_ids,loss_mask,advantages,old_logprobs[,ref_logprobs]}`;
//!   `lambda` (a scalar).
//! - outputs: `loss.sft`, `loss.rl` (θ_0, step 0's batch), `lower.<θ>`
//!   (∇θ L_low there), `theta_K.<θ>`, `next.<state input>` for every
//!   optimiser and shadow state, and for BRIDGE `loss.up`, `hyper.<w>`,
//!   `next.<w>` and `gain` = L_RL(θ̂_K, w) − L_RL(θ_K, w), the cooperative
//!   gain on the last step's batch.

use crate::autodiff::{grad, vjp};
use crate::ir::{DType, Graph, NodeId, Shape, StepOut, StepRule, TokenAgg};
use crate::losses::{agg_count, aggregate_with, grpo, grpo_loss, safe_count, sft_loss, RlBatch};
use crate::model::{
    frozen_shapes, lora_shapes, lower_shapes, policy_theta_shapes, Decoder, Params,
};
use crate::passes::Pipeline;
use crate::plan::{
    BatchField, Metric, Role, ENTROPY, LAMBDA, LOGPROBS, LR_SCALE_LOWER, LR_SCALE_UPPER, TOKEN_IDS,
};
use crate::schedule::{human_bytes, human_flops, schedule};
use crate::spec::{HypergradKind, Method, OptimKind, OptimSpec, PipelineSpec, ShadowMode};

/// Static batch shapes of one compiled meta-step: one process's share of
/// the batch, and how many processes share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShapes {
    pub sft_batch: usize,
    pub rl_batch: usize,
    pub seq_len: usize,
    /// Processes of a data-parallel run, each with batches of the shapes
    /// above; 1 for one process. With more than one, losses are shares of
    /// the whole batch's and gradients are summed over the processes
    /// (`Op::AllReduceSum`).
    pub world: usize,
}

impl BatchShapes {
    /// The shapes the pipeline's `[sft]`, `[rl]` and `[train]` sections give.
    pub fn from_spec(spec: &PipelineSpec) -> Self {
        BatchShapes {
            sft_batch: spec.sft.batch_size,
            rl_batch: spec.rl.batch_size(),
            seq_len: spec.train.seq_len,
            world: 1,
        }
    }

    /// One program instance's share when `world` processes, each running
    /// `train.micro_batches` instances in turn, split the pipeline's
    /// batches: every mini-batch's rows are divided evenly, so each batch
    /// must split into `world × train.micro_batches × rl.mini_batches`
    /// equal parts. `world` of the result counts the instances.
    pub fn for_world(spec: &PipelineSpec, world: usize) -> Result<Self, String> {
        Self::split(spec, world, spec.train.micro_batches.max(1))
    }

    /// One process's share (all its micro-batches) when `world` processes
    /// split the batches: the shapes its sampler and scorer take.
    pub fn per_process(spec: &PipelineSpec, world: usize) -> Result<Self, String> {
        Self::split(spec, world, 1)
    }

    fn split(spec: &PipelineSpec, world: usize, micro: usize) -> Result<Self, String> {
        let whole = Self::from_spec(spec);
        let world = world.max(1);
        let instances = world * micro;
        if instances == 1 && spec.train.micro_batches <= 1 {
            return Ok(whole);
        }
        let minis = spec.rl.mini_batches.max(1);
        // Every part the batch is cut into, whatever `micro` asks for, so
        // that the process's and its instances' shapes are checked alike.
        let full = world * spec.train.micro_batches.max(1) * minis;
        let check = |what: &str, n: usize| -> Result<usize, String> {
            if n.is_multiple_of(full) {
                Ok(n / instances)
            } else {
                let mut by = vec![if world == 1 {
                    "1 process".to_string()
                } else {
                    format!("{world} processes")
                }];
                if spec.train.micro_batches > 1 {
                    by.push(format!(
                        "train.micro_batches = {}",
                        spec.train.micro_batches
                    ));
                }
                if minis > 1 {
                    by.push(format!("rl.mini_batches = {minis}"));
                }
                Err(format!(
                    "{what} is {n} rows, which {} cannot split evenly: it must be a multiple of {full}",
                    by.join(" × ")
                ))
            }
        };
        Ok(BatchShapes {
            sft_batch: check("sft.batch_size", whole.sft_batch)?,
            rl_batch: check(
                "the RL batch (rl.prompts_per_step × rl.group_size)",
                whole.rl_batch,
            )?,
            seq_len: whole.seq_len,
            world: instances,
        })
    }
}

/// The lowered meta-step and a description of its interface.
pub struct MetaStep {
    pub graph: Graph,
    pub theta: Vec<(String, Shape)>,
    pub lora: Vec<(String, Shape)>,
    /// Decisions worth reporting (memory plan, approximations).
    pub notes: Vec<String>,
}

/// The role of a meta-step input other than θ and w, by the name this
/// lowering gave it: `shadow.*`, `opt.*`, λ, `step{k}.*`.
pub fn meta_step_input_role(name: &str) -> Option<Role> {
    if let Some(of) = name.strip_prefix("shadow.") {
        Some(Role::Shadow { of: of.to_string() })
    } else if name.starts_with("opt.") {
        Some(Role::OptimState)
    } else if name == LAMBDA {
        Some(Role::Lambda)
    } else if name == LR_SCALE_LOWER || name == LR_SCALE_UPPER {
        Some(Role::LrScale)
    } else {
        batch_role(name)
    }
}

/// The role of a meta-step output, by the name this lowering gave it:
/// metrics, `theta_K.*` and `next.*` state, `lower.*`, `hyper.*`.
pub fn meta_step_output_role(name: &str) -> Option<Role> {
    let of = |p: &str| name.strip_prefix(p).map(str::to_string);
    if let Some(m) = Metric::ALL.into_iter().find(|m| m.name() == name) {
        Some(Role::Metric(m))
    } else if let Some(of) = of("theta_K.").or_else(|| of("next.")) {
        Some(Role::Next { of })
    } else if let Some(of) = of("lower.") {
        Some(Role::LowerGradient { of })
    } else {
        of("hyper.").map(|of| Role::Hypergradient { of })
    }
}

/// The role of a `step{k}.{field}` input.
fn batch_role(name: &str) -> Option<Role> {
    let rest = name.strip_prefix("step")?;
    let (k, key) = rest.split_once('.')?;
    let step = k.parse().ok()?;
    let field = BatchField::ALL.into_iter().find(|f| f.key() == key)?;
    Some(Role::Batch { step, field })
}

/// One update's data as graph nodes: a step's batch inputs, or a
/// mini-batch (a slice of their rows).
#[derive(Clone, Copy)]
struct StepBatch {
    sft_ids: NodeId,
    sft_mask: NodeId,
    rl: RlBatch,
}

fn batch_inputs(
    g: &mut Graph,
    spec: &PipelineSpec,
    shapes: BatchShapes,
    dt: DType,
    k: usize,
) -> StepBatch {
    let (bs, br, t) = (shapes.sft_batch, shapes.rl_batch, shapes.seq_len);
    StepBatch {
        sft_ids: g.input(
            BatchField::SftInputIds.input_name(k),
            DType::I32,
            vec![bs, t],
        ),
        sft_mask: g.input(BatchField::SftLossMask.input_name(k), dt, vec![bs, t]),
        rl: RlBatch {
            input_ids: g.input(
                BatchField::RlInputIds.input_name(k),
                DType::I32,
                vec![br, t],
            ),
            loss_mask: g.input(BatchField::RlLossMask.input_name(k), dt, vec![br, t]),
            advantages: g.input(BatchField::RlAdvantages.input_name(k), dt, vec![br]),
            old_logprobs: g.input(BatchField::RlOldLogprobs.input_name(k), dt, vec![br, t]),
            ref_logprobs: (spec.rl.loss_kl_coef() > 0.0)
                .then(|| g.input(BatchField::RlRefLogprobs.input_name(k), dt, vec![br, t])),
        },
    }
}

/// Rows `m · n / parts .. (m + 1) · n / parts` of every tensor of `b`
/// (n the batch's rows): mini-batch `m` of `parts`; `b` itself when
/// `parts` is 1.
fn mini_batch(g: &mut Graph, b: StepBatch, m: usize, parts: usize) -> StepBatch {
    if parts <= 1 {
        return b;
    }
    let rows = |g: &mut Graph, x: NodeId| {
        let n = g.ty(x).shape[0];
        let per = n / parts;
        g.slice_axis(x, 0, m * per, (m + 1) * per)
    };
    StepBatch {
        sft_ids: rows(g, b.sft_ids),
        sft_mask: rows(g, b.sft_mask),
        rl: RlBatch {
            input_ids: rows(g, b.rl.input_ids),
            loss_mask: rows(g, b.rl.loss_mask),
            advantages: rows(g, b.rl.advantages),
            old_logprobs: rows(g, b.rl.old_logprobs),
            ref_logprobs: b.rl.ref_logprobs.map(|r| rows(g, r)),
        },
    }
}

/// The losses of the meta-step, as functions of parameter nodes.
struct Objective<'a> {
    spec: &'a PipelineSpec,
    decoder: Decoder<'a>,
    /// Each optimiser update's batch, in order (K · updates of them), then
    /// the last step's whole batch, which the upper objective reads.
    batches: Vec<StepBatch>,
    lambda: NodeId,
    /// θ's tensors the lower level does not train (with a LoRA of θ).
    frozen: Params,
    /// Processes sharing each batch (see `BatchShapes::world`).
    world: usize,
    /// With more than one process: each batch's `(SFT, RL)` share factor
    /// `n / Σ_ranks n` (see `losses::agg_count`), summed once at the start.
    shares: Vec<(NodeId, NodeId)>,
}

struct LowerLosses {
    sft: NodeId,
    rl: NodeId,
}

/// `Σ_ranks` of each of `xs` in a data-parallel run of `world` processes,
/// as one sum over processes of their concatenation (one collective, taken
/// when the last of them is ready, rather than one per tensor in the middle
/// of a backward pass); `xs` themselves in one process.
fn sum_all_over_ranks(g: &mut Graph, world: usize, xs: &[NodeId]) -> Vec<NodeId> {
    if world <= 1 || xs.is_empty() {
        return xs.to_vec();
    }
    let flat: Vec<NodeId> = xs
        .iter()
        .map(|&x| {
            let n = g.ty(x).numel();
            g.reshape(x, vec![n])
        })
        .collect();
    let cat = if flat.len() == 1 {
        flat[0]
    } else {
        g.concat(&flat, 0)
    };
    let sum = g.all_reduce_sum(cat);
    let mut off = 0;
    xs.iter()
        .map(|&x| {
            let shape = g.ty(x).shape.clone();
            let n = g.ty(x).numel();
            let part = g.slice_axis(sum, 0, off, off + n);
            off += n;
            g.reshape(part, shape)
        })
        .collect()
}

/// Each batch's `(SFT, RL)` share factor `n / Σ_ranks n`, the counts summed
/// in one collective (created before any forward pass, so that a process's
/// micro-batches meet there holding no activations).
fn share_factors(
    g: &mut Graph,
    world: usize,
    spec: &PipelineSpec,
    batches: &[StepBatch],
) -> Vec<(NodeId, NodeId)> {
    if world <= 1 {
        return vec![];
    }
    let agg = grpo(&spec.rl).agg();
    let counts: Vec<NodeId> = batches
        .iter()
        .flat_map(|b| [(TokenAgg::TokenMean, b.sft_mask), (agg, b.rl.loss_mask)])
        .map(|(a, m)| agg_count(g, a, m))
        .collect();
    let totals = sum_all_over_ranks(g, world, &counts);
    let ratios: Vec<NodeId> = counts
        .iter()
        .zip(&totals)
        .map(|(&n, &t)| {
            // A batch without tokens on any process: every share is 0, as
            // the one process's mean over nothing is.
            let t = safe_count(g, t);
            g.div(n, t)
        })
        .collect();
    ratios.chunks(2).map(|c| (c[0], c[1])).collect()
}

impl Objective<'_> {
    /// `Σ_ranks` of each of `xs` (see [`sum_all_over_ranks`]).
    fn sum_over_ranks(&self, g: &mut Graph, xs: &[NodeId]) -> Vec<NodeId> {
        sum_all_over_ranks(g, self.world, xs)
    }

    /// This process's share of batch `k`'s SFT (`rl = false`) or RL loss:
    /// `loss · n / Σ_ranks n`; the loss itself in one process.
    fn share(&self, g: &mut Graph, loss: NodeId, k: usize, rl: bool) -> NodeId {
        match self.shares.get(k) {
            Some(&(sft, rl_share)) => g.mul(loss, if rl { rl_share } else { sft }),
            None => loss,
        }
    }

    /// θ's trained tensors with the frozen ones.
    fn with_frozen(&self, theta: &Params) -> Params {
        let mut all = self.frozen.clone();
        all.extend(theta.iter().map(|(n, &id)| (n.clone(), id)));
        all
    }

    fn sft(&self, g: &mut Graph, theta: &Params, w: &Params, k: usize) -> NodeId {
        let b = &self.batches[k];
        let theta = self.with_frozen(theta);
        let lp = self.decoder.token_logprobs(g, &theta, w, b.sft_ids);
        let loss = sft_loss(g, lp, b.sft_mask);
        self.share(g, loss, k, false)
    }

    fn rl(&self, g: &mut Graph, theta: &Params, w: &Params, k: usize) -> NodeId {
        let b = &self.batches[k];
        let theta = self.with_frozen(theta);
        let rl = &self.spec.rl;
        if rl.entropy_coef == 0.0 {
            let lp = self.decoder.token_logprobs(g, &theta, w, b.rl.input_ids);
            let loss = grpo_loss(g, rl, lp, &b.rl);
            return self.share(g, loss, k, true);
        }
        // The entropy bonus: −c × the entropy on response tokens, weighted
        // as the policy loss weighs its tokens.
        let (lp, entropy) = self
            .decoder
            .token_logprobs_and_entropy(g, &theta, w, b.rl.input_ids);
        let loss = grpo_loss(g, rl, lp, &b.rl);
        let h = aggregate_with(g, grpo(rl).agg(), entropy, b.rl.loss_mask);
        let bonus = g.scale(h, rl.entropy_coef);
        let loss = g.sub(loss, bonus);
        self.share(g, loss, k, true)
    }

    /// Term `i` of the lower loss (1−λ) L_SFT + λ L_RL on step k's batch:
    /// `(weighted term, loss)` with i = 0 the SFT and i = 1 the RL loss.
    fn lower_term(
        &self,
        g: &mut Graph,
        theta: &Params,
        w: &Params,
        k: usize,
        i: usize,
    ) -> (NodeId, NodeId) {
        if i == 0 {
            let sft = self.sft(g, theta, w, k);
            let one = g.full_like(1.0, self.lambda);
            let oml = g.sub(one, self.lambda);
            (g.mul(oml, sft), sft)
        } else {
            let rl = self.rl(g, theta, w, k);
            (g.mul(self.lambda, rl), rl)
        }
    }
}

/// The terms of a chain's loss (see `Lowering::chain_term`): the lower
/// chain's SFT (0) and RL (1) terms — only the SFT term for `sft`, whose λ
/// is 0 throughout, so that it computes nothing for a term of weight 0 —
/// and the shadow's one.
fn chain_terms(chain: Chain, method: Method) -> &'static [usize] {
    match (chain, method) {
        (Chain::Lower, Method::Sft) => &[0],
        (Chain::Lower, _) => &[0, 1],
        (Chain::Shadow, _) => &[0],
    }
}

/// Σ of equally long lists of nodes, elementwise.
fn add_lists(g: &mut Graph, acc: Option<Vec<NodeId>>, xs: Vec<NodeId>) -> Vec<NodeId> {
    match acc {
        None => xs,
        Some(a) => a.iter().zip(&xs).map(|(&p, &q)| g.add(p, q)).collect(),
    }
}

/// An optimiser's state for a list of parameters.
struct OptState {
    /// Per-parameter buffers by PyTorch state name (momentum_buffer, exp_avg, exp_avg_sq).
    buffers: Vec<(&'static str, Vec<NodeId>)>,
    /// AdamW's step count (a scalar), before this meta-step.
    step: Option<NodeId>,
}

fn state_names(kind: OptimKind) -> &'static [&'static str] {
    match kind {
        OptimKind::Sgd => &[],
        OptimKind::Momentum { .. } => &["momentum_buffer"],
        OptimKind::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
    }
}

/// Declares the optimiser state of `params` as inputs `{prefix}.{state}.{param}`.
fn state_inputs(
    g: &mut Graph,
    kind: OptimKind,
    prefix: &str,
    params: &[(String, Shape)],
    dt: DType,
) -> OptState {
    let buffers = state_names(kind)
        .iter()
        .map(|&s| {
            let nodes = params
                .iter()
                .map(|(n, shape)| g.input(format!("{prefix}.{s}.{n}"), dt, shape.clone()))
                .collect();
            (s, nodes)
        })
        .collect();
    let step = matches!(kind, OptimKind::AdamW { .. })
        .then(|| g.input(format!("{prefix}.step"), dt, vec![]));
    OptState { buffers, step }
}

/// A fresh (zero) optimiser state.
fn zero_state(g: &mut Graph, kind: OptimKind, params: &[NodeId]) -> OptState {
    let buffers = state_names(kind)
        .iter()
        .map(|&s| (s, params.iter().map(|&p| g.full_like(0.0, p)).collect()))
        .collect();
    let step = match (kind, params.first()) {
        (OptimKind::AdamW { .. }, Some(&p)) => {
            let dt = g.ty(p).dtype;
            Some(g.full(0.0, dt, vec![]))
        }
        _ => None,
    };
    OptState { buffers, step }
}

impl OptState {
    fn buffer(&self, name: &str) -> &[NodeId] {
        &self
            .buffers
            .iter()
            .find(|(n, _)| *n == name)
            .expect("optimiser buffer")
            .1
    }
}

/// What the adjoint of one optimiser step needs (coefficients held constant).
enum StepAdjoint {
    Sgd {
        lr: f64,
    },
    Momentum {
        lr: f64,
        mu: f64,
    },
    /// θ' = (1 − lr·wd) θ − D ⊙ m', m' = β1 m + (1 − β1) g, D frozen.
    AdamW {
        decay: f64,
        beta1: f64,
        d: Vec<NodeId>,
    },
}

/// One optimiser step as the pipeline asks for it: the gradient clipped to
/// `opt.max_grad_norm`, the rule's step at `opt.lr`, and, with a learning-rate
/// multiplier `scale` (an input of this meta-step), the update scaled by it:
/// every rule's update is linear in lr, so `θ + s (θ'_lr − θ)` is the step at
/// `s · lr`.
struct Step {
    new: Vec<NodeId>,
    state: OptState,
    adjoint: StepAdjoint,
    /// The learning-rate multiplier.
    scale: Option<NodeId>,
    /// The clip coefficient `min(1, max / (‖g‖ + 1e-6))`, behind a
    /// stop_gradient: the adjoint holds it constant, as it holds AdamW's
    /// step size.
    clip: Option<NodeId>,
    /// ‖g‖ before clipping, where the step clips.
    norm: Option<NodeId>,
}

fn opt_step(
    g: &mut Graph,
    opt: OptimSpec,
    params: &[NodeId],
    grads: &[NodeId],
    state: &OptState,
    scale: Option<NodeId>,
) -> Step {
    let (grads, clip, norm) = match opt.max_grad_norm {
        Some(max) if !grads.is_empty() => {
            let norm = global_norm(g, grads);
            let eps = g.full_like(1e-6, norm);
            let den = g.add(norm, eps);
            let num = g.full_like(max, den);
            let q = g.div(num, den);
            let one = g.full_like(1.0, q);
            let c = g.min(q, one);
            let c = g.stop_gradient(c);
            let clipped = grads.iter().map(|&gr| times_scalar(g, gr, c)).collect();
            (clipped, Some(c), Some(norm))
        }
        _ => (grads.to_vec(), None, None),
    };
    let (mut new, state, adjoint) = rule_step(g, opt, params, &grads, state);
    if let Some(s) = scale {
        for (x, &p) in new.iter_mut().zip(params) {
            let d = g.sub(*x, p);
            let sd = times_scalar(g, d, s);
            *x = g.add(p, sd);
        }
    }
    Step {
        new,
        state,
        adjoint,
        scale,
        clip,
        norm,
    }
}

/// `c · x`, times the scalar node `s` when there is one.
fn scaled(g: &mut Graph, x: NodeId, c: f64, s: Option<NodeId>) -> NodeId {
    let cx = g.scale(x, c);
    match s {
        Some(s) => times_scalar(g, cx, s),
        None => cx,
    }
}

/// `x` times the scalar node `s`.
fn times_scalar(g: &mut Graph, x: NodeId, s: NodeId) -> NodeId {
    let shape = g.ty(x).shape.clone();
    let sb = if shape.is_empty() {
        s
    } else {
        g.broadcast(s, shape)
    };
    g.mul(x, sb)
}

/// One step of the optimiser's rule at `opt.lr`; returns new params, new
/// state and the adjoint data.
fn rule_step(
    g: &mut Graph,
    opt: OptimSpec,
    params: &[NodeId],
    grads: &[NodeId],
    state: &OptState,
) -> (Vec<NodeId>, OptState, StepAdjoint) {
    let lr = opt.lr;
    let state_ops = |i: usize| -> Vec<NodeId> { state.buffers.iter().map(|(_, b)| b[i]).collect() };
    match opt.kind {
        OptimKind::Sgd => {
            let rule = StepRule::Sgd { lr: lr.into() };
            let new = params
                .iter()
                .zip(grads)
                .map(|(&p, &gr)| g.optim_step(rule, StepOut::Param, &[p, gr]))
                .collect();
            (
                new,
                OptState {
                    buffers: vec![],
                    step: None,
                },
                StepAdjoint::Sgd { lr },
            )
        }
        OptimKind::Momentum { momentum } => {
            let rule = StepRule::Momentum {
                lr: lr.into(),
                mu: momentum.into(),
            };
            let (mut new, mut bufs) = (vec![], vec![]);
            for (i, (&p, &gr)) in params.iter().zip(grads).enumerate() {
                let mut ops = vec![p, gr];
                ops.extend(state_ops(i));
                let outs = g.optim_steps(rule, &ops);
                new.push(outs[0]);
                bufs.push(outs[1]);
            }
            let st = OptState {
                buffers: vec![("momentum_buffer", bufs)],
                step: None,
            };
            (new, st, StepAdjoint::Momentum { lr, mu: momentum })
        }
        OptimKind::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => {
            let step0 = state.step.expect("adamw step count");
            let one = g.full_like(1.0, step0);
            let t = g.add(step0, one);
            let rule = StepRule::AdamW {
                lr: lr.into(),
                beta1: beta1.into(),
                beta2: beta2.into(),
                eps: eps.into(),
                weight_decay: weight_decay.into(),
            };
            let (mut new, mut ms, mut vs, mut ds) = (vec![], vec![], vec![], vec![]);
            for (i, (&p, &gr)) in params.iter().zip(grads).enumerate() {
                let mut ops = vec![p, gr];
                ops.extend(state_ops(i));
                ops.push(t);
                // θ', m', v' and the step size D, frozen in the adjoint.
                let outs = g.optim_steps(rule, &ops);
                new.push(outs[0]);
                ms.push(outs[1]);
                vs.push(outs[2]);
                ds.push(outs[3]);
            }
            let st = OptState {
                buffers: vec![("exp_avg", ms), ("exp_avg_sq", vs)],
                step: Some(t),
            };
            let adj = StepAdjoint::AdamW {
                decay: rule.decay().unwrap_or(1.0),
                beta1,
                d: ds,
            };
            (new, st, adj)
        }
    }
}

/// One differentiated step of a chain (lower or shadow), kept for the adjoint.
struct StepRecord {
    /// stop_gradient(θ_k): the point the step's gradient was taken at.
    theta_in: Vec<NodeId>,
    /// This process's share of ∇θ of the step's loss at theta_in (before
    /// the sum over processes and clipping): second-order products
    /// differentiate it.
    grads: Vec<NodeId>,
    adjoint: StepAdjoint,
    /// The step's learning-rate multiplier and clip coefficient.
    scale: Option<NodeId>,
    clip: Option<NodeId>,
}

/// Which loss a chain minimises.
#[derive(Clone, Copy, PartialEq)]
enum Chain {
    Lower,
    Shadow,
}

fn add_opt(g: &mut Graph, a: Option<NodeId>, b: NodeId) -> NodeId {
    match a {
        Some(a) => g.add(a, b),
        None => b,
    }
}

/// Σ over tensors of Σ x² → sqrt: the 2-norm of all tensors concatenated.
fn global_norm(g: &mut Graph, xs: &[NodeId]) -> NodeId {
    let mut total: Option<NodeId> = None;
    for &x in xs {
        let sq = g.mul(x, x);
        let s = g.sum_all(sq);
        total = Some(add_opt(g, total, s));
    }
    let total = total.expect("at least one tensor");
    g.sqrt(total)
}

/// The end of an unrolled chain.
struct Unrolled {
    theta: Vec<NodeId>,
    state: OptState,
    records: Vec<StepRecord>,
    /// Lower chain: step 0's losses, gradient and (where it clips) the
    /// gradient's norm.
    first: Option<(LowerLosses, Vec<NodeId>, Option<NodeId>)>,
}

struct Lowering<'a> {
    obj: Objective<'a>,
    /// Put `stop_gradient` on each iterate before taking its loss.
    detach: bool,
    /// Exact second-order products recompute the step's forward pass.
    recompute: bool,
    theta_names: Vec<String>,
    w_names: Vec<String>,
    w: Vec<NodeId>,
    /// The lower optimiser's learning-rate multiplier (lower and shadow
    /// chains), where its schedule is not constant.
    lower_scale: Option<NodeId>,
}

impl Lowering<'_> {
    fn detach(&self, g: &mut Graph, xs: &[NodeId]) -> Vec<NodeId> {
        if self.detach {
            xs.iter().map(|&t| g.stop_gradient(t)).collect()
        } else {
            xs.to_vec()
        }
    }

    fn params(names: &[String], nodes: &[NodeId]) -> Params {
        names.iter().cloned().zip(nodes.iter().copied()).collect()
    }

    /// Term `i` of a chain's loss at θ on step k's batch, `(weighted term,
    /// loss)`: the lower chain's loss is (1−λ) L_SFT + λ L_RL, the
    /// shadow's L_RL. Its gradient is the sum of the terms' gradients, and
    /// building each term's forward pass and its derivatives before the
    /// next term's forward means only one term's activations are alive at
    /// a time.
    fn chain_term(
        &self,
        g: &mut Graph,
        chain: Chain,
        theta: &[NodeId],
        k: usize,
        i: usize,
    ) -> (NodeId, NodeId) {
        let tp = Self::params(&self.theta_names, theta);
        let wp = Self::params(&self.w_names, &self.w);
        match chain {
            Chain::Lower => self.obj.lower_term(g, &tp, &wp, k, i),
            Chain::Shadow => {
                let rl = self.obj.rl(g, &tp, &wp, k);
                (rl, rl)
            }
        }
    }

    /// A chain's loss at θ (the sum of its terms).
    fn chain_loss(&self, g: &mut Graph, chain: Chain, theta: &[NodeId], k: usize) -> NodeId {
        let mut total = None;
        for &i in chain_terms(chain, self.obj.spec.bilevel.method) {
            let (t, _) = self.chain_term(g, chain, theta, k, i);
            total = Some(add_opt(g, total, t));
        }
        total.expect("a chain has a term")
    }

    /// Runs K steps of a chain from `theta0`, recording the last `record` steps.
    #[allow(clippy::too_many_arguments)]
    fn unroll(
        &self,
        g: &mut Graph,
        chain: Chain,
        opt: OptimSpec,
        theta0: &[NodeId],
        state0: OptState,
        k_steps: usize,
        record: usize,
    ) -> Unrolled {
        let mut theta = theta0.to_vec();
        let mut state = state0;
        let mut records = Vec::new();
        let mut first = None;
        for k in 0..k_steps {
            let theta_in = self.detach(g, &theta);
            // Each term's forward pass and gradient in turn.
            let (mut grads, mut losses) = (None, vec![]);
            for &i in chain_terms(chain, self.obj.spec.bilevel.method) {
                let (term, loss) = self.chain_term(g, chain, &theta_in, k, i);
                let gr = grad(g, term, &theta_in);
                grads = Some(add_lists(g, grads, gr));
                losses.push(loss);
            }
            if losses.len() == 1 && chain == Chain::Lower {
                // `sft`: no RL term, whose loss reads as 0.
                losses.push(g.full_like(0.0, self.obj.lambda));
            }
            let local = grads.expect("a chain has a term");
            // The gradient of the whole batch: the sum of the processes'.
            let grads = self.obj.sum_over_ranks(g, &local);
            let step = opt_step(g, opt, &theta, &grads, &state, self.lower_scale);
            if k == 0 && chain == Chain::Lower {
                let parts = LowerLosses {
                    sft: losses[0],
                    rl: losses[1],
                };
                first = Some((parts, grads.clone(), step.norm));
            }
            if k + record >= k_steps {
                records.push(StepRecord {
                    theta_in,
                    grads: local,
                    adjoint: step.adjoint,
                    scale: step.scale,
                    clip: step.clip,
                });
            }
            theta = step.new;
            state = step.state;
        }
        Unrolled {
            theta,
            state,
            records,
            first,
        }
    }

    /// This process's share of (∂²L/∂θ∂θ · u, ∂²L/∂w∂θ · u) for step k of a
    /// chain at the recorded point, where `u` is this process's share of
    /// the direction (the direction is their sum, which each process's
    /// products are taken along).
    fn second_order(
        &self,
        g: &mut Graph,
        chain: Chain,
        rec: &StepRecord,
        k: usize,
        u: &[NodeId],
        kind: HypergradKind,
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let n = self.theta_names.len();
        let u = self.obj.sum_over_ranks(g, u);
        let u = &u[..];
        match kind {
            HypergradKind::FiniteDifference { eps } => {
                let norm = global_norm(g, u);
                let tiny = g.full_like(1e-30, norm);
                let norm = g.max(norm, tiny);
                let e = g.full_like(eps, norm);
                let step = g.div(e, norm);
                let at = |g: &mut Graph, sign: f64| {
                    let moved: Vec<NodeId> = rec
                        .theta_in
                        .iter()
                        .zip(u)
                        .map(|(&t, &d)| {
                            let shape = g.ty(t).shape.clone();
                            let sb = g.broadcast(step, shape);
                            let delta = g.mul(sb, d);
                            let delta = g.scale(delta, sign);
                            // The perturbed point is data: ∇w below must not
                            // follow u's own dependence on w.
                            let moved = g.add(t, delta);
                            g.stop_gradient(moved)
                        })
                        .collect();
                    let loss = self.chain_loss(g, chain, &moved, k);
                    let mut wrt = moved.clone();
                    wrt.extend(&self.w);
                    grad(g, loss, &wrt)
                };
                let plus = at(g, 1.0);
                let minus = at(g, -1.0);
                let two_step = g.scale(step, 2.0);
                let diffs: Vec<NodeId> = plus
                    .iter()
                    .zip(&minus)
                    .map(|(&p, &m)| {
                        let d = g.sub(p, m);
                        let shape = g.ty(d).shape.clone();
                        let den = g.broadcast(two_step, shape);
                        g.div(d, den)
                    })
                    .collect();
                (diffs[..n].to_vec(), diffs[n..].to_vec())
            }
            _ => {
                let prods = if self.recompute {
                    // A distinct copy of θ_k, so the step is rebuilt rather
                    // than merged back into the forward unroll by CSE; each
                    // loss term's forward pass, gradient and second-order
                    // product in turn, so one term's activations are alive
                    // at a time.
                    let tag = 1 + k as u32 + if chain == Chain::Shadow { 1 << 16 } else { 0 };
                    let at: Vec<NodeId> = rec.theta_in.iter().map(|&t| g.barrier(t, tag)).collect();
                    let mut wrt = at.clone();
                    wrt.extend(&self.w);
                    let mut prods = None;
                    for &i in chain_terms(chain, self.obj.spec.bilevel.method) {
                        let (term, _) = self.chain_term(g, chain, &at, k, i);
                        let grads = grad(g, term, &at);
                        let p = vjp(g, &grads, u, &wrt);
                        prods = Some(add_lists(g, prods, p));
                    }
                    prods.expect("a chain has a term")
                } else {
                    let mut wrt = rec.theta_in.clone();
                    wrt.extend(&self.w);
                    vjp(g, &rec.grads, u, &wrt)
                };
                (prods[..n].to_vec(), prods[n..].to_vec())
            }
        }
    }

    /// Adds the chain's contribution to the hypergradient, running the adjoint
    /// recurrence from v = ∂L_up/∂θ_K back over the recorded steps.
    #[allow(clippy::too_many_arguments)]
    fn adjoint(
        &self,
        g: &mut Graph,
        chain: Chain,
        records: &[StepRecord],
        k_steps: usize,
        v_final: Vec<NodeId>,
        kind: HypergradKind,
        h: &mut [NodeId],
    ) {
        let mut v = v_final;
        // Cotangent of the optimiser buffer that carries gradients (momentum
        // buffer / exp_avg); zero at θ_K.
        let mut vbuf: Option<Vec<NodeId>> = None;
        for (i, rec) in records.iter().enumerate().rev() {
            let k = k_steps - records.len() + i;
            let (u, next_vbuf, v_theta): (Vec<NodeId>, Option<Vec<NodeId>>, Vec<NodeId>) =
                match &rec.adjoint {
                    StepAdjoint::Sgd { lr } => {
                        let u = v.iter().map(|&x| scaled(g, x, -lr, rec.scale)).collect();
                        (u, None, v.clone())
                    }
                    StepAdjoint::Momentum { lr, mu } => {
                        let ub: Vec<NodeId> = v
                            .iter()
                            .enumerate()
                            .map(|(j, &x)| {
                                let t = scaled(g, x, -lr, rec.scale);
                                match &vbuf {
                                    Some(b) => g.add(b[j], t),
                                    None => t,
                                }
                            })
                            .collect();
                        let nb = ub.iter().map(|&x| g.scale(x, *mu)).collect();
                        (ub, Some(nb), v.clone())
                    }
                    StepAdjoint::AdamW { decay, beta1, d } => {
                        let um: Vec<NodeId> = v
                            .iter()
                            .enumerate()
                            .map(|(j, &x)| {
                                let dx = g.mul(d[j], x);
                                let t = scaled(g, dx, -1.0, rec.scale);
                                match &vbuf {
                                    Some(b) => g.add(b[j], t),
                                    None => t,
                                }
                            })
                            .collect();
                        let u = um.iter().map(|&x| g.scale(x, 1.0 - beta1)).collect();
                        let nb = um.iter().map(|&x| g.scale(x, *beta1)).collect();
                        // θ' = (1 − s (1 − decay)) θ − s D ⊙ m'.
                        let vt = match rec.scale {
                            _ if *decay == 1.0 => v.clone(),
                            None => v.iter().map(|&x| g.scale(x, *decay)).collect(),
                            Some(s) => {
                                let ks = g.scale(s, -(1.0 - decay));
                                let one = g.full_like(1.0, ks);
                                let k = g.add(one, ks);
                                v.iter().map(|&x| times_scalar(g, x, k)).collect()
                            }
                        };
                        (u, Some(nb), vt)
                    }
                };
            // The step took c·g: the gradient's cotangent is c·u.
            let u: Vec<NodeId> = match rec.clip {
                Some(c) => u.iter().map(|&x| times_scalar(g, x, c)).collect(),
                None => u,
            };
            let (h_theta, h_w) = self.second_order(g, chain, rec, k, &u, kind);
            v = v_theta
                .iter()
                .zip(&h_theta)
                .map(|(&a, &b)| g.add(a, b))
                .collect();
            for (hj, &c) in h.iter_mut().zip(&h_w) {
                *hj = g.add(*hj, c);
            }
            vbuf = next_vbuf;
        }
    }
}

/// How the exact second-order products of `truncated` get the activations
/// of the inner steps they differentiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryPlan {
    /// Reuse the forward unroll's activations: they stay alive until the
    /// adjoint sweep reaches their step.
    Keep,
    /// Recompute each differentiated step's forward pass in the adjoint
    /// sweep (behind a `barrier`, so CSE keeps the copy); only the iterates
    /// θ_k stay alive.
    Recompute,
}

/// Options of the lowering; `Default` is what `lower_meta_step` uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct LowerOptions {
    /// Leave the iterates differentiable (no `stop_gradient` between steps),
    /// so plain autodiff of `loss.up` with respect to w gives the exact
    /// hypergradient through all K steps (AdamW's preconditioner frozen) —
    /// an independent reference for the adjoint recurrence.
    pub differentiable_unroll: bool,
    /// Force a memory plan; `None` lets the compiler pick the one with the
    /// smaller estimated peak.
    pub memory: Option<MemoryPlan>,
}

/// Log-probs of a batch of ids [rl_batch, seq_len] under (θ, w), and the
/// entropies of the next-token distributions they come from: the program
/// that scores rollouts (π_old, π_ref).
pub fn lower_logprobs(spec: &PipelineSpec, shapes: BatchShapes) -> Graph {
    let dt = spec.backend.dtype.dtype();
    let mut g = Graph::new();
    let declare = |g: &mut Graph, v: Vec<(String, Vec<usize>)>| -> Params {
        v.into_iter()
            .map(|(n, s)| {
                let id = g.input(n.clone(), dt, s);
                (n, id)
            })
            .collect()
    };
    let theta = declare(&mut g, policy_theta_shapes(&spec.model));
    let w = declare(&mut g, lora_shapes(&spec.model, &spec.lora));
    let ids = g.input(TOKEN_IDS, DType::I32, vec![shapes.rl_batch, shapes.seq_len]);
    let dec = Decoder {
        model: &spec.model,
        lora: &spec.lora,
        dtype: spec.backend.dtype.compute(),
    };
    let (lp, entropy) = dec.token_logprobs_and_entropy(&mut g, &theta, &w, ids);
    g.set_output(LOGPROBS, lp);
    g.set_output(ENTROPY, entropy);
    g
}

/// Lowers the meta-step of `spec` for batches of the given shapes, choosing
/// the memory plan, and runs the standard pass pipeline on it.
pub fn lower_meta_step(spec: &PipelineSpec, shapes: BatchShapes) -> MetaStep {
    lower_meta_step_with(spec, shapes, LowerOptions::default())
}

/// As `lower_meta_step`, with options.
pub fn lower_meta_step_with(
    spec: &PipelineSpec,
    shapes: BatchShapes,
    opts: LowerOptions,
) -> MetaStep {
    let truncated = spec.bilevel.method == Method::Bridge
        && spec.bilevel.hypergradient.kind == HypergradKind::Truncated
        && spec.bilevel.hypergradient.backprop > 0
        && !opts.differentiable_unroll;
    // The optimised meta-step, its estimated peak and its FLOPs.
    let optimised = |plan: MemoryPlan| {
        let mut ms = build_meta_step(spec, shapes, opts.differentiable_unroll, plan);
        Pipeline::standard().run(&mut ms.graph);
        let sc = schedule(&ms.graph);
        (ms, sc.peak_bytes, sc.flops)
    };
    if !truncated {
        return optimised(MemoryPlan::Keep).0;
    }
    match opts.memory {
        Some(plan) => {
            let (mut ms, peak, _) = optimised(plan);
            ms.notes.push(format!(
                "memory plan: {plan:?} (requested), estimated peak {}",
                human_bytes(peak)
            ));
            ms
        }
        None => {
            let (keep, keep_peak, keep_flops) = optimised(MemoryPlan::Keep);
            if let Some(budget) = spec
                .backend
                .memory_budget
                .filter(|&b| keep_peak as u64 <= b)
            {
                let mut ms = keep;
                ms.notes.push(format!(
                    "memory plan: keep the forward activations for the adjoint sweep (estimated peak {}, within the budget of {})",
                    human_bytes(keep_peak),
                    human_bytes(budget as usize)
                ));
                return ms;
            }
            let (re, re_peak, re_flops) = optimised(MemoryPlan::Recompute);
            let recompute = re_peak < keep_peak;
            let (mut ms, choice) = if recompute {
                (
                    re,
                    "recompute each differentiated step's activations in the adjoint sweep",
                )
            } else {
                (keep, "keep the forward activations for the adjoint sweep")
            };
            // What keeping would take: the smallest budget, in hundredths
            // of a GiB, that the kept peak fits.
            let hint = if recompute {
                let gib_bytes = (1u64 << 30) as f64;
                let mut gib = (keep_peak as f64 / gib_bytes * 100.0).ceil() / 100.0;
                // As the front end reads it: gib · 2³⁰ bytes, truncated.
                while ((gib * gib_bytes) as u64) < keep_peak as u64 {
                    gib += 0.01;
                }
                format!("; `[backend] memory_budget_gib = {gib:.2}` or more keeps them")
            } else {
                String::new()
            };
            ms.notes.push(format!(
                "memory plan: {choice} (estimated peak {} and {} when kept, {} and {} when recomputed{hint})",
                human_bytes(keep_peak),
                human_flops(keep_flops),
                human_bytes(re_peak),
                human_flops(re_flops),
            ));
            ms
        }
    }
}

fn build_meta_step(
    spec: &PipelineSpec,
    shapes: BatchShapes,
    differentiable_unroll: bool,
    memory: MemoryPlan,
) -> MetaStep {
    let dt = spec.backend.dtype.dtype();
    // θ as the lower level sees it: the tensors it trains (all of θ, or
    // its LoRA) and those it only reads.
    let theta_spec = lower_shapes(&spec.model);
    let frozen_spec = frozen_shapes(&spec.model);
    let lora_spec = lora_shapes(&spec.model, &spec.lora);
    let hg = spec.bilevel.hypergradient;
    let k_steps = hg.unroll.max(1);
    let bridge = spec.bilevel.method == Method::Bridge;
    let mut notes = Vec::new();
    let mut g = Graph::new();

    let theta0: Vec<NodeId> = theta_spec
        .iter()
        .map(|(n, s)| g.input(n.clone(), dt, s.clone()))
        .collect();
    let frozen: Params = frozen_spec
        .iter()
        .map(|(n, s)| (n.clone(), g.input(n.clone(), dt, s.clone())))
        .collect();
    let w: Vec<NodeId> = lora_spec
        .iter()
        .map(|(n, s)| g.input(n.clone(), dt, s.clone()))
        .collect();
    let lambda = g.input(LAMBDA, dt, vec![]);
    let lower_scale =
        (!spec.optim.lower.schedule.is_constant()).then(|| g.input(LR_SCALE_LOWER, dt, vec![]));
    let steps: Vec<StepBatch> = (0..k_steps)
        .map(|k| batch_inputs(&mut g, spec, shapes, dt, k))
        .collect();
    // Each step's batch is `updates_per_batch` epochs of `mini_batches`
    // updates (π_old stays the sampling policy's); the upper objective
    // reads the last step's whole batch.
    let (epochs, minis) = (
        spec.rl.updates_per_batch.max(1),
        spec.rl.mini_batches.max(1),
    );
    let updates = epochs * minis;
    let mut batches = Vec::with_capacity(k_steps * updates + 1);
    for &b in &steps {
        let slices: Vec<StepBatch> = (0..minis)
            .map(|m| mini_batch(&mut g, b, m, minis))
            .collect();
        for _ in 0..epochs {
            batches.extend(&slices);
        }
    }
    batches.push(steps[k_steps - 1]);
    let shares = share_factors(&mut g, shapes.world, spec, &batches);
    let low = Lowering {
        obj: Objective {
            spec,
            decoder: Decoder {
                model: &spec.model,
                lora: &spec.lora,
                dtype: spec.backend.dtype.compute(),
            },
            batches,
            lambda,
            frozen,
            world: shapes.world,
            shares,
        },
        detach: !differentiable_unroll,
        recompute: memory == MemoryPlan::Recompute,
        theta_names: theta_spec.iter().map(|(n, _)| n.clone()).collect(),
        w_names: lora_spec.iter().map(|(n, _)| n.clone()).collect(),
        w: w.clone(),
        lower_scale,
    };
    let lower_opt = spec.optim.lower;
    // The hypergradient's backprop counts steps; each is `updates` updates.
    let backprop = updates
        * match hg.kind {
            _ if !bridge => 0,
            HypergradKind::FirstOrder => 0,
            _ => hg.backprop.min(k_steps),
        };
    let k_steps = k_steps * updates;

    // Lower chain.
    let lower_state = state_inputs(&mut g, lower_opt.kind, "opt.lower", &theta_spec, dt);
    let lower_state_names: Vec<(&'static str, Vec<NodeId>)> = lower_state.buffers.clone();
    let lower_step_in = lower_state.step;
    let Unrolled {
        theta: theta_k,
        state: lower_next,
        records: lower_records,
        first,
    } = low.unroll(
        &mut g,
        Chain::Lower,
        lower_opt,
        &theta0,
        lower_state,
        k_steps,
        backprop,
    );
    let (first_losses, first_grads, first_norm) = first.expect("at least one lower step");
    // The losses of the whole batch: the sums of the processes' shares.
    let losses = low
        .obj
        .sum_over_ranks(&mut g, &[first_losses.sft, first_losses.rl]);
    g.set_output(Metric::SftLoss.name(), losses[0]);
    g.set_output(Metric::RlLoss.name(), losses[1]);
    if let Some(norm) = first_norm {
        g.set_output(Metric::LowerGradNorm.name(), norm);
    }
    for (name, &gr) in low.theta_names.iter().zip(&first_grads) {
        g.set_output(format!("lower.{name}"), gr);
    }
    for (name, &t) in low.theta_names.iter().zip(&theta_k) {
        g.set_output(format!("theta_K.{name}"), t);
    }
    set_state_outputs(
        &mut g,
        "opt.lower",
        &low.theta_names,
        &lower_state_names,
        lower_step_in,
        &lower_next,
    );

    if bridge {
        // Shadow chain.
        let (shadow0, shadow_state) = match spec.bilevel.shadow {
            ShadowMode::Persistent => {
                let s0: Vec<NodeId> = theta_spec
                    .iter()
                    .map(|(n, s)| g.input(format!("shadow.{n}"), dt, s.clone()))
                    .collect();
                let st = state_inputs(&mut g, lower_opt.kind, "opt.shadow", &theta_spec, dt);
                (s0, st)
            }
            ShadowMode::OneStep => {
                let st = zero_state(&mut g, lower_opt.kind, &theta0);
                (theta0.clone(), st)
            }
        };
        let shadow_state_names = shadow_state.buffers.clone();
        let shadow_step_in = shadow_state.step;
        let Unrolled {
            theta: shadow_k,
            state: shadow_next,
            records: shadow_records,
            ..
        } = low.unroll(
            &mut g,
            Chain::Shadow,
            lower_opt,
            &shadow0,
            shadow_state,
            k_steps,
            backprop,
        );
        if spec.bilevel.shadow == ShadowMode::Persistent {
            for (name, &t) in low.theta_names.iter().zip(&shadow_k) {
                g.set_output(format!("next.shadow.{name}"), t);
            }
            set_state_outputs(
                &mut g,
                "opt.shadow",
                &low.theta_names,
                &shadow_state_names,
                shadow_step_in,
                &shadow_next,
            );
        }

        // Upper objective at θ_K, θ̂_K on the last step's whole batch.
        let last = k_steps;
        let tk_in = low.detach(&mut g, &theta_k);
        let sk_in = low.detach(&mut g, &shadow_k);
        let tp = Lowering::params(&low.theta_names, &tk_in);
        let sp = Lowering::params(&low.theta_names, &sk_in);
        let wp = Lowering::params(&low.w_names, &w);
        let mut wrt = tk_in.clone();
        wrt.extend(&sk_in);
        wrt.extend(&w);
        // L_up = (1−λ) L_SFT(θ_K) + λ L_RL(θ_K) − λ L_RL(θ̂_K), each term's
        // forward pass and gradient in turn.
        let (a, _) = low.obj.lower_term(&mut g, &tp, &wp, last, 0);
        let mut d = grad(&mut g, a, &wrt);
        let (b, rl_theta) = low.obj.lower_term(&mut g, &tp, &wp, last, 1);
        let db = grad(&mut g, b, &wrt);
        d = add_lists(&mut g, Some(d), db);
        let rl_shadow = low.obj.rl(&mut g, &sp, &wp, last);
        let lr = g.mul(lambda, rl_shadow);
        let c = g.neg(lr);
        let dc = grad(&mut g, c, &wrt);
        d = add_lists(&mut g, Some(d), dc);
        let ab = g.add(a, b);
        let l_up = g.add(ab, c);
        // J_RL(θ_K, w) − J_RL(θ̂_K, w): what joint training gained over RL alone.
        let gain = g.sub(rl_shadow, rl_theta);
        let sums = low.obj.sum_over_ranks(&mut g, &[l_up, gain]);
        g.set_output(Metric::UpperLoss.name(), sums[0]);
        g.set_output(Metric::Gain.name(), sums[1]);
        let n = theta_k.len();
        let (v_theta, v_shadow, mut h) =
            (d[..n].to_vec(), d[n..2 * n].to_vec(), d[2 * n..].to_vec());
        if backprop > 0 && low.detach {
            low.adjoint(
                &mut g,
                Chain::Lower,
                &lower_records,
                k_steps,
                v_theta,
                hg.kind,
                &mut h,
            );
            low.adjoint(
                &mut g,
                Chain::Shadow,
                &shadow_records,
                k_steps,
                v_shadow,
                hg.kind,
                &mut h,
            );
        }
        // Each process holds its share of the hypergradient; the update
        // takes their sum.
        let h = low.obj.sum_over_ranks(&mut g, &h);
        for (name, &hj) in low.w_names.iter().zip(&h) {
            g.set_output(format!("hyper.{name}"), hj);
        }
        // Upper update.
        let upper = spec.optim.upper;
        let upper_state = state_inputs(&mut g, upper.kind, "opt.upper", &lora_spec, dt);
        let upper_names = upper_state.buffers.clone();
        let upper_step_in = upper_state.step;
        let upper_scale =
            (!upper.schedule.is_constant()).then(|| g.input(LR_SCALE_UPPER, dt, vec![]));
        let step = opt_step(&mut g, upper, &w, &h, &upper_state, upper_scale);
        if let Some(norm) = step.norm {
            g.set_output(Metric::UpperGradNorm.name(), norm);
        }
        let (w_next, upper_next) = (step.new, step.state);
        for (name, &x) in low.w_names.iter().zip(&w_next) {
            g.set_output(format!("next.{name}"), x);
        }
        set_state_outputs(
            &mut g,
            "opt.upper",
            &low.w_names,
            &upper_names,
            upper_step_in,
            &upper_next,
        );
        notes.push(match hg.kind {
            HypergradKind::FirstOrder => "hypergradient: first_order (θ, θ̂ held fixed)".to_string(),
            HypergradKind::Truncated => {
                format!("hypergradient: truncated through the last {backprop} of {k_steps} lower and shadow updates")
            }
            HypergradKind::FiniteDifference { eps } => format!(
                "hypergradient: finite differences (eps {eps}) through the last {backprop} of {k_steps} updates; \
                 the perturbed gradients recompute their activations"
            ),
        });
        if matches!(lower_opt.kind, OptimKind::AdamW { .. }) && backprop > 0 {
            notes.push("AdamW lower optimiser: the hypergradient treats the preconditioner 1/(sqrt(v̂)+eps) as constant".into());
        }
    } else {
        notes.push(format!(
            "method {}: lower steps only (no shadow, adapter frozen)",
            spec.bilevel.method.name()
        ));
    }
    if updates > 1 {
        notes.push(format!(
            "{updates} updates per rollout batch ({epochs} × {minis} mini-batches), {k_steps} per meta-step; π_old fixed at sampling"
        ));
    }
    MetaStep {
        graph: g,
        theta: theta_spec,
        lora: lora_spec,
        notes,
    }
}

fn set_state_outputs(
    g: &mut Graph,
    prefix: &str,
    names: &[String],
    inputs: &[(&'static str, Vec<NodeId>)],
    step_in: Option<NodeId>,
    next: &OptState,
) {
    for (state, _) in inputs {
        for (name, &x) in names.iter().zip(next.buffer(state)) {
            g.set_output(format!("next.{prefix}.{state}.{name}"), x);
        }
    }
    if let (Some(_), Some(t)) = (step_in, next.step) {
        g.set_output(format!("next.{prefix}.step"), t);
    }
}
