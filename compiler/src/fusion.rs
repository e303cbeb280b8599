//! Kernel fusion: partitions a graph's schedule into device kernels. Chains
//! of elementwise ops (with the broadcasts that feed them) become one
//! *elementwise program*; a reduction absorbs the elementwise program that
//! only it consumes (its prologue) and the elementwise ops applied to its
//! result (its epilogue). Everything else is a kernel of its own.
//!
//! The program IR ([`ElemProgram`]) is small and serialisable: the GPU
//! backend specialises one generic kernel on it (the op list is a compile-time
//! constant of the kernel), and [`ElemProgram::eval`] is its host reference.

use crate::ir::{
    clamp_value, strides, AttentionOperand, BinaryOp, CompareOp, DType, Graph, LogprobOperand,
    NodeId, NormOperand, Op, ReduceKind, StepOut, StepRule, UnaryOp,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;

/// A register of an elementwise program: the index of the instruction that
/// defines it.
pub type Reg = u32;

/// How a program input is indexed from the kernel's element index.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Index {
    /// The same linear index (the input has the kernel's shape).
    Same,
    /// NumPy broadcasting: the kernel's index is split by `shape` (the
    /// kernel's shape) and recombined with `strides` (the input's strides,
    /// 0 on broadcast axes).
    Broadcast { shape: Vec<u32>, strides: Vec<u32> },
}

/// One instruction of an elementwise program; it defines the register with
/// its own position. Values are floats; booleans are 0 or 1 and integers are
/// whole numbers (the device stores every tensor as f32).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ElemInstr {
    /// Element of program input `input`, indexed as `index` says.
    Load {
        input: u32,
        index: Index,
    },
    /// A constant, as f64 bits.
    Const(u64),
    Unary(UnaryOp, Reg),
    Binary(BinaryOp, Reg, Reg),
    /// 1 where the comparison holds, else 0.
    Compare(CompareOp, Reg, Reg),
    /// `a` where `cond != 0`, else `b`.
    Select(Reg, Reg, Reg),
    /// Clamp to `[min, max]` (f64 bits).
    Clamp(Reg, u64, u64),
    /// Conversion to `dtype` with the CPU executor's semantics (to i32:
    /// truncation toward zero, NaN → 0; to bool: `!= 0`; floats: identity).
    Cast(DType, Reg),
}

/// A straight-line elementwise program: inputs in, `outputs` registers out.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ElemProgram {
    pub n_inputs: u32,
    pub instrs: Vec<ElemInstr>,
    pub outputs: Vec<Reg>,
}

impl ElemProgram {
    /// The program that loads input 0 (at the kernel's index).
    pub fn load() -> ElemProgram {
        ElemProgram {
            n_inputs: 1,
            instrs: vec![ElemInstr::Load {
                input: 0,
                index: Index::Same,
            }],
            outputs: vec![0],
        }
    }

    /// The program that writes one constant everywhere (a fill).
    pub fn constant(v: f64) -> ElemProgram {
        ElemProgram {
            n_inputs: 0,
            instrs: vec![ElemInstr::Const(v.to_bits())],
            outputs: vec![0],
        }
    }

    /// Evaluates the program at one element index with inputs read by `load`
    /// (input slot, linear index in that input) — the host reference.
    pub fn eval(&self, index: usize, load: impl Fn(u32, usize) -> f64) -> Vec<f64> {
        let mut regs: Vec<f64> = Vec::with_capacity(self.instrs.len());
        for ins in &self.instrs {
            let r = |i: &Reg| regs[*i as usize];
            let v = match ins {
                ElemInstr::Load { input, index: ix } => load(*input, ix.map(index)),
                ElemInstr::Const(bits) => f64::from_bits(*bits),
                ElemInstr::Unary(op, a) => op.apply(r(a)),
                ElemInstr::Binary(op, a, b) => op.apply(r(a), r(b)),
                ElemInstr::Compare(op, a, b) => f64::from(u8::from(op.apply(r(a), r(b)))),
                ElemInstr::Select(c, a, b) => {
                    if r(c) != 0.0 {
                        r(a)
                    } else {
                        r(b)
                    }
                }
                ElemInstr::Clamp(a, lo, hi) => {
                    clamp_value(r(a), f64::from_bits(*lo), f64::from_bits(*hi))
                }
                ElemInstr::Cast(to, a) => cast_value(*to, r(a)),
            };
            regs.push(v);
        }
        self.outputs.iter().map(|o| regs[*o as usize]).collect()
    }
}

/// The value `v` converted to `to` and back to f64, as the CPU executor casts.
pub fn cast_value(to: DType, v: f64) -> f64 {
    match to {
        DType::F32 => v as f32 as f64,
        DType::F64 => v,
        DType::I32 => v as i32 as f64,
        DType::Bool => f64::from(u8::from(v != 0.0)),
    }
}

/// `Σ_a ((i / Π_{b>a} shape_b) mod shape_a) · strides_a`: the offset of
/// element `i` of a row-major `shape` in a layout with `strides`.
pub fn strided_offset(shape: &[u32], strides: &[u32], i: usize) -> usize {
    let mut rest = i;
    let mut at = 0usize;
    for (d, s) in shape.iter().zip(strides).rev() {
        let d = *d as usize;
        at += (rest % d) * *s as usize;
        rest /= d;
    }
    at
}

impl Index {
    /// The input's linear index for kernel element `i`.
    pub fn map(&self, i: usize) -> usize {
        match self {
            Index::Same => i,
            Index::Broadcast { shape, strides } => strided_offset(shape, strides, i),
        }
    }
}

/// Where the reduced axes of a reduction lie in its (row-major) operand:
/// output element `o` (split by `out_shape`, recombined with `out_strides`)
/// reduces the operand elements `base(o) + Σ r_a · red_strides[a]` over the
/// reduced index `r` split by `red_shape`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReduceLayout {
    pub out_shape: Vec<u32>,
    pub out_strides: Vec<u32>,
    pub red_shape: Vec<u32>,
    pub red_strides: Vec<u32>,
}

impl ReduceLayout {
    pub fn new(in_shape: &[usize], axes: &[usize]) -> ReduceLayout {
        let st = strides(in_shape);
        let mut l = ReduceLayout {
            out_shape: vec![],
            out_strides: vec![],
            red_shape: vec![],
            red_strides: vec![],
        };
        for (a, (&d, &s)) in in_shape.iter().zip(&st).enumerate() {
            if axes.contains(&a) {
                l.red_shape.push(d as u32);
                l.red_strides.push(s as u32);
            } else {
                l.out_shape.push(d as u32);
                l.out_strides.push(s as u32);
            }
        }
        l
    }

    pub fn out_numel(&self) -> usize {
        self.out_shape.iter().map(|&d| d as usize).product()
    }

    pub fn red_numel(&self) -> usize {
        self.red_shape.iter().map(|&d| d as usize).product()
    }

    /// Operand index of output element `o`, reduced element `r`.
    pub fn input_index(&self, o: usize, r: usize) -> usize {
        strided_offset(&self.out_shape, &self.out_strides, o)
            + strided_offset(&self.red_shape, &self.red_strides, r)
    }
}

/// One device kernel of a fused schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Kernel {
    /// An elementwise program over `numel` elements: reads `inputs` (program
    /// input slot i = `inputs[i]`), writes program output j to `outputs[j]`.
    Elementwise {
        program: ElemProgram,
        numel: usize,
        inputs: Vec<NodeId>,
        outputs: Vec<NodeId>,
    },
    /// A reduction whose operand is computed by `prologue` (output 0, over
    /// the operand's index space, reading `prologue_inputs`) and whose
    /// result, as input 0 of `epilogue` (over the result's index space, with
    /// further inputs `epilogue_inputs` from slot 1), gives `outputs`.
    Reduce {
        kind: ReduceKind,
        layout: ReduceLayout,
        prologue: ElemProgram,
        prologue_inputs: Vec<NodeId>,
        epilogue: ElemProgram,
        epilogue_inputs: Vec<NodeId>,
        outputs: Vec<NodeId>,
    },
    /// The (batched) matrix product `id` of `a · b`. An operand of `id`
    /// that is a transpose of the last two axes read only by matrix
    /// products is not computed: `a` (or `b`) is then its source, read
    /// with the last two axes swapped (`trans_a`, `trans_b`).
    MatMul {
        id: NodeId,
        a: NodeId,
        b: NodeId,
        trans_a: bool,
        trans_b: bool,
    },
    /// The fused linear log-prob: `id` (the log-probs of `targets`, one
    /// per row) of the logits `h · wᵀ`, without them: an
    /// `Op::LinearLogprob`, or a matched subgraph (matmul → [slice] →
    /// log-softmax → take-along-axis) that would have materialised them.
    /// `h [rows_in, d]`, `w [vocab, d]`;
    /// output row `t` reads row `(t / seq_out) · seq_in + t % seq_out` of
    /// `h`.
    LinearLogprob {
        id: NodeId,
        h: NodeId,
        w: NodeId,
        targets: NodeId,
        seq_out: usize,
        seq_in: usize,
    },
    /// Causal softmax attention `id` of `q [B, H, T, hd]` over `k, v
    /// [B, H_kv, T, hd]` (query head h reads key/value head h / (H / H_kv)),
    /// scores scaled by 1/√hd: an `Op::CausalAttention`, or a matched
    /// subgraph (`model::causal_attention`, with `attention::expand_kv`'s expansion)
    /// that would have materialised the `[B, H, T, T]` scores and
    /// probabilities.
    Attention {
        id: NodeId,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        kv_heads: usize,
    },
    /// The `causal_attention_grad` nodes `grads` (one per operand asked
    /// for) that share their operands `inputs` (q, k, v, o, do): one
    /// forward pass for the per-row log-sum-exp, then the backward kernels
    /// (dq, and dk with dv), shared by all of them.
    AttentionGrads {
        inputs: [NodeId; 5],
        grads: Vec<(AttentionOperand, NodeId)>,
        kv_heads: usize,
    },
    /// The `linear_logprob_grad` nodes `grads` that share their operands
    /// `inputs` (h, w, targets, g): one forward pass for the log-sum-exp,
    /// then one backward kernel per gradient.
    LogprobGrads {
        inputs: [NodeId; 4],
        grads: Vec<(LogprobOperand, NodeId)>,
    },
    /// One optimiser step on one parameter: the `optim_step` nodes
    /// `outputs` (one per value asked for) that share their operands
    /// `(θ, g, state…)`. The gradient `g` is output 0 of `prologue` (over
    /// the parameter's `numel` elements, reading `prologue_inputs`): the
    /// elementwise group that computes it when nothing else reads that
    /// group's values, else a load of `g`; the kernel also writes `g` as
    /// `gradient` when the group is fused and something else reads `g`
    /// (a graph output). `state` is the other operands in order (θ, the
    /// state buffers, AdamW's step count).
    OptimStep {
        rule: StepRule,
        numel: usize,
        prologue: ElemProgram,
        prologue_inputs: Vec<NodeId>,
        state: Vec<NodeId>,
        outputs: Vec<(StepOut, NodeId)>,
        gradient: Option<NodeId>,
    },
    /// Any other node, computed alone.
    Node(NodeId),
}

impl Kernel {
    /// Nodes whose values this kernel writes.
    pub fn writes(&self) -> Vec<NodeId> {
        match self {
            Kernel::Elementwise { outputs, .. } | Kernel::Reduce { outputs, .. } => outputs.clone(),
            Kernel::MatMul { id, .. }
            | Kernel::LinearLogprob { id, .. }
            | Kernel::Attention { id, .. }
            | Kernel::Node(id) => vec![*id],
            Kernel::AttentionGrads { grads, .. } => grads.iter().map(|g| g.1).collect(),
            Kernel::LogprobGrads { grads, .. } => grads.iter().map(|g| g.1).collect(),
            Kernel::OptimStep {
                outputs, gradient, ..
            } => outputs.iter().map(|o| o.1).chain(*gradient).collect(),
        }
    }

    /// Bytes of device buffers the kernel's launches use besides what it
    /// reads and writes, freed when it ends (f32): the per-row log-sum-exp
    /// of the attention and log-prob kernels (and the split log-prob
    /// forward's partials), and for their gradients the rows' delta, the
    /// sibling gradients the backward kernels compute but no node asked
    /// for, the log-prob forward's discarded log-probs and scratch, a chunk
    /// of the gradients' coefficients `[N, chunk]` (see
    /// `linear_logprob::device_backward_scratch`); the per-row 1/rms of an
    /// RMSNorm gain's gradient.
    pub fn scratch_bytes(&self, g: &Graph) -> usize {
        let n = |id: &NodeId| g.ty(*id).numel();
        let elems = match self {
            Kernel::Attention { q, .. } => n(q) / g.ty(*q).shape[3].max(1),
            // The log-sum-exp; the split forward's partials and target logits.
            Kernel::LinearLogprob {
                id,
                w,
                seq_out,
                seq_in,
                ..
            } => {
                let split = if seq_out == seq_in {
                    crate::linear_logprob::device_forward_scratch(n(id), g.ty(*w).shape[0])
                } else {
                    0
                };
                n(id) + split
            }
            Kernel::AttentionGrads { inputs, grads, .. } => {
                let [q, k] = [&inputs[0], &inputs[1]];
                let rows = n(q) / g.ty(*q).shape[3].max(1);
                let asked = |w| grads.iter().any(|(x, _)| *x == w);
                let kv = asked(AttentionOperand::K) || asked(AttentionOperand::V);
                // lse of the forward, delta; dq unless asked; dk or dv when
                // only the other is asked.
                2 * rows
                    + if asked(AttentionOperand::Q) { 0 } else { n(q) }
                    + if kv && !(asked(AttentionOperand::K) && asked(AttentionOperand::V)) {
                        n(k)
                    } else {
                        0
                    }
            }
            // The forward's log-probs, log-sum-exp and scratch; one chunk
            // of the coefficients (and a temporary for dh).
            Kernel::LogprobGrads { inputs, .. } => {
                let [n, d] = [0, 1].map(|a| g.ty(inputs[0]).shape[a]);
                let vocab = g.ty(inputs[1]).shape[0];
                crate::linear_logprob::device_backward_scratch(n, d, vocab)
            }
            // Each row's 1/rms, for the gain's gradient.
            Kernel::Node(id) => match g.op(*id) {
                Op::RmsNormGrad {
                    wrt: NormOperand::Weight,
                    ..
                } => n(&g.inputs(*id)[0]) / n(id).max(1),
                _ => 0,
            },
            _ => 0,
        };
        4 * elems
    }

    /// Nodes whose values this kernel reads.
    pub fn reads(&self, g: &Graph) -> Vec<NodeId> {
        match self {
            Kernel::Elementwise { inputs, .. } => inputs.clone(),
            Kernel::Reduce {
                prologue_inputs,
                epilogue_inputs,
                ..
            } => prologue_inputs
                .iter()
                .chain(epilogue_inputs)
                .copied()
                .collect(),
            Kernel::MatMul { a, b, .. } => vec![*a, *b],
            Kernel::LinearLogprob { h, w, targets, .. } => vec![*h, *w, *targets],
            Kernel::Attention { q, k, v, .. } => vec![*q, *k, *v],
            Kernel::AttentionGrads { inputs, .. } => inputs.to_vec(),
            Kernel::LogprobGrads { inputs, .. } => inputs.to_vec(),
            Kernel::OptimStep {
                prologue_inputs,
                state,
                ..
            } => prologue_inputs.iter().chain(state).copied().collect(),
            Kernel::Node(id) => g.inputs(*id),
        }
    }
}

/// A graph's schedule as kernels, in an order that respects dependencies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedSchedule {
    pub kernels: Vec<Kernel>,
    /// Scheduled nodes folded into fused kernels.
    pub fused_nodes: usize,
}

impl FusedSchedule {
    pub fn count(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for k in &self.kernels {
            match k {
                Kernel::Elementwise { .. } => c.0 += 1,
                Kernel::Reduce { .. } => c.1 += 1,
                Kernel::MatMul { .. }
                | Kernel::LinearLogprob { .. }
                | Kernel::Attention { .. }
                | Kernel::AttentionGrads { .. }
                | Kernel::LogprobGrads { .. }
                | Kernel::OptimStep { .. }
                | Kernel::Node(_) => c.2 += 1,
            }
        }
        c
    }

    /// The index of the last kernel reading each value of `g` — after it
    /// the value's buffer can be freed — and `usize::MAX` for the outputs.
    pub fn last_uses(&self, g: &Graph) -> HashMap<NodeId, usize> {
        let mut last_use = HashMap::new();
        for (k, kernel) in self.kernels.iter().enumerate() {
            for r in kernel.reads(g) {
                last_use.insert(r, k);
            }
        }
        for (_, id) in g.outputs() {
            last_use.insert(*id, usize::MAX);
        }
        last_use
    }

    /// The device executor's footprint running this schedule of `g`: the
    /// most bytes its buffers hold at once. Every element takes 4 bytes
    /// (the device stores f32); the inputs are held by the caller for the
    /// whole run (resident state); constants are live throughout too (kept
    /// with the prepared graph after its first run); a kernel's outputs are
    /// allocated when it runs and freed after the last kernel that reads
    /// them; a reshape (or stop-gradient, barrier) shares its operand's
    /// buffer; the outputs live to the end; a kernel's scratch buffers
    /// ([`Kernel::scratch_bytes`]) count while it runs. A lower bound on
    /// what the allocator holds, which also rounds and pools.
    pub fn device_peak_bytes(&self, g: &Graph) -> usize {
        self.simulate_device(g, None).0
    }

    /// The buffers live at the device footprint's peak (each named by the
    /// node that made it, largest first), with that footprint.
    pub fn device_peak_live(&self, g: &Graph) -> (usize, Vec<NodeId>) {
        let (peak, at, _) = self.simulate_device(g, None);
        let mut live = self.simulate_device(g, Some(at)).2.unwrap_or_default();
        live.sort_by_key(|&id| std::cmp::Reverse(g.ty(id).numel()));
        (peak, live)
    }

    /// The footprint simulation of [`Self::device_peak_bytes`]: the peak,
    /// the kernel index where it is first reached, and (with `at`) the
    /// buffers live after kernel `at` allocated its outputs.
    fn simulate_device(&self, g: &Graph, at: Option<usize>) -> (usize, usize, Option<Vec<NodeId>>) {
        let bytes = |id: NodeId| 4 * g.ty(id).numel().max(1);
        let last_use = self.last_uses(g);
        // Node → buffer (an alias shares its operand's); buffer → (bytes,
        // nodes still holding it, the node that made it).
        let mut buffer_of: HashMap<NodeId, usize> = HashMap::new();
        let mut buffers: Vec<(usize, usize, NodeId)> = Vec::new();
        let mut live = 0usize;
        // Inputs, and constants (cached with the prepared graph, so live
        // from the start on every run after the first).
        for k in &self.kernels {
            if let Kernel::Node(id) = k {
                if let Op::Input { .. } | Op::Literal { .. } = g.op(*id) {
                    live += bytes(*id);
                    buffers.push((bytes(*id), usize::MAX, *id));
                    buffer_of.insert(*id, buffers.len() - 1);
                }
            }
        }
        let (mut peak, mut peak_at) = (live, 0);
        let mut snapshot = None;
        for (k, kernel) in self.kernels.iter().enumerate() {
            for id in kernel.writes() {
                if buffer_of.contains_key(&id) {
                    continue; // an input, counted from the start
                }
                // A relabeling alone (not computed inside a fused program).
                let alias = matches!(kernel, Kernel::Node(_))
                    && matches!(
                        g.op(id),
                        Op::Reshape { .. } | Op::StopGradient | Op::Barrier { .. }
                    );
                let b = if alias {
                    let b = buffer_of[&g.inputs(id)[0]];
                    if buffers[b].1 != usize::MAX {
                        buffers[b].1 += 1;
                    }
                    b
                } else {
                    live += bytes(id);
                    buffers.push((bytes(id), 1, id));
                    buffers.len() - 1
                };
                buffer_of.insert(id, b);
            }
            let running = live + kernel.scratch_bytes(g);
            if running > peak {
                (peak, peak_at) = (running, k);
            }
            if at == Some(k) {
                snapshot = Some(buffers.iter().filter(|b| b.1 > 0).map(|b| b.2).collect());
            }
            let mut dead: Vec<NodeId> = kernel.reads(g);
            dead.sort();
            dead.dedup();
            for r in dead {
                if last_use.get(&r) != Some(&k) {
                    continue;
                }
                if let Some(&b) = buffer_of.get(&r) {
                    let (size, holders, _) = &mut buffers[b];
                    if *holders != usize::MAX {
                        *holders -= 1;
                        if *holders == 0 {
                            live -= *size;
                        }
                    }
                }
            }
        }
        (peak, peak_at, snapshot)
    }
}

impl fmt::Display for FusedSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (e, r, o) = self.count();
        write!(
            f,
            "{} kernels ({e} elementwise programs, {r} fused reductions, {o} other) for {} fused nodes",
            self.kernels.len(),
            self.fused_nodes
        )
    }
}

/// Most buffers (inputs and outputs) one fused kernel may bind: wgpu
/// adapters commonly allow 32 storage buffers per shader stage, and the
/// kernel's metadata takes one more.
pub const MAX_KERNEL_BUFFERS: usize = 24;

/// Ops an elementwise program can compute.
fn fusible(op: &Op) -> bool {
    op.is_elementwise() || matches!(op, Op::Broadcast { .. })
}

/// An open group of fusible nodes over one index space.
struct Group {
    numel: usize,
    /// The reduction this group is the epilogue of, if any.
    anchor: Option<NodeId>,
    members: Vec<NodeId>,
    set: HashSet<NodeId>,
}

struct Fuser<'g> {
    g: &'g Graph,
    order: Vec<NodeId>,
    graph_outputs: HashSet<NodeId>,
    users: HashMap<NodeId, Vec<NodeId>>,
    groups: Vec<Option<Group>>,
    group_of: HashMap<NodeId, usize>,
    kernels: Vec<Kernel>,
    fused_nodes: usize,
    /// Per open reduction: the elementwise group it absorbs as prologue.
    prologues: HashMap<NodeId, Option<Group>>,
    /// Constants (and broadcasts of constants) written to a buffer because
    /// a kernel that cannot inline them reads them.
    materialised: HashSet<NodeId>,
    /// Matrix transposes read only by matrix products, which read their
    /// sources instead (see [`Kernel::MatMul`]).
    folded: HashSet<NodeId>,
    /// Hand-written kernels put in place of matched subgraphs (the fused
    /// linear log-prob, attention) by the node they compute, and the nodes
    /// they absorb (never computed).
    replaced: HashMap<NodeId, Kernel>,
    absorbed: HashSet<NodeId>,
}

/// A constant fill, or a broadcast of one: inlined into programs as a
/// constant rather than read from memory.
fn constant_value(g: &Graph, id: NodeId) -> Option<f64> {
    match g.op(id) {
        Op::Full { value, .. } => Some(value.get()),
        Op::Broadcast { .. } => constant_value(g, g.inputs(id)[0]),
        _ => None,
    }
}

/// Partitions the nodes in `order` (a dependency order of the nodes the
/// outputs need, e.g. [`crate::schedule::schedule`]'s) into kernels.
pub fn fuse(g: &Graph, order: &[NodeId]) -> FusedSchedule {
    let mut users: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    for &id in order {
        for x in g.inputs(id) {
            let u = users.entry(x).or_default();
            if !u.contains(&id) {
                u.push(id);
            }
        }
    }
    let graph_outputs: HashSet<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let mut folded: HashSet<NodeId> = order
        .iter()
        .copied()
        .filter(|id| {
            g.op(*id).is_matrix_transpose()
                && !graph_outputs.contains(id)
                && users.get(id).is_some_and(|us| {
                    !us.is_empty() && us.iter().all(|u| matches!(g.op(*u), Op::MatMul))
                })
        })
        .collect();
    let mut replaced = HashMap::new();
    let mut absorbed = HashSet::new();
    group_gradients(g, order, &mut replaced, &mut absorbed);
    transposed_step_gradients(g, &users, &graph_outputs, &mut replaced, &mut absorbed);
    for &id in order {
        if let Some(kernel) = op_kernel(g, id) {
            replaced.insert(id, kernel);
            continue;
        }
        let matched = match_linear_logprob(g, id, &users, &graph_outputs)
            .or_else(|| match_attention(g, id, &users, &graph_outputs));
        if let Some((kernel, inner)) = matched {
            replaced.insert(id, kernel);
            absorbed.extend(inner);
        }
    }
    // What only absorbed nodes read (a matched pattern's masks and
    // constants) is not computed either; what the fused kernels read is.
    let kept: HashSet<NodeId> = replaced
        .values()
        .flat_map(|k: &Kernel| k.reads(g))
        .collect();
    // A transpose a replacing kernel reads is computed, not folded.
    folded.retain(|x| !kept.contains(x));
    for &id in order.iter().rev() {
        let dead = !graph_outputs.contains(&id)
            && !replaced.contains_key(&id)
            && !kept.contains(&id)
            && users
                .get(&id)
                .is_some_and(|us| !us.is_empty() && us.iter().all(|u| absorbed.contains(u)));
        if dead {
            absorbed.insert(id);
        }
    }
    let mut f = Fuser {
        g,
        order: order.to_vec(),
        graph_outputs,
        folded,
        replaced,
        absorbed,
        users,
        groups: vec![],
        group_of: HashMap::new(),
        kernels: vec![],
        fused_nodes: 0,
        prologues: HashMap::new(),
        materialised: HashSet::new(),
    };
    f.run();
    FusedSchedule {
        kernels: f.kernels,
        fused_nodes: f.fused_nodes,
    }
}

/// The hand-written kernel that computes an IR op by itself: the linear
/// log-prob and the causal attention.
fn op_kernel(g: &Graph, id: NodeId) -> Option<Kernel> {
    let ins = g.inputs(id);
    match g.op(id) {
        Op::LinearLogprob => {
            let rows = g.ty(ins[0]).shape[0];
            Some(Kernel::LinearLogprob {
                id,
                h: ins[0],
                w: ins[1],
                targets: ins[2],
                seq_out: rows,
                seq_in: rows,
            })
        }
        Op::CausalAttention => Some(Kernel::Attention {
            id,
            q: ins[0],
            k: ins[1],
            v: ins[2],
            kv_heads: g.ty(ins[1]).shape[1],
        }),
        _ => None,
    }
}

/// Puts one `Kernel::AttentionGrads` (`Kernel::LogprobGrads`,
/// `Kernel::OptimStep`) in place of the `causal_attention_grad`
/// (`linear_logprob_grad`, `optim_step`) nodes that share their operands,
/// at the first of them in `order`; the others are absorbed (the kernel
/// writes them too). An optimiser step's gradient is loaded until the
/// fuser gives it a prologue.
fn group_gradients(
    g: &Graph,
    order: &[NodeId],
    replaced: &mut HashMap<NodeId, Kernel>,
    absorbed: &mut HashSet<NodeId>,
) {
    let mut first: HashMap<Vec<NodeId>, NodeId> = HashMap::new();
    for &id in order {
        let inputs = g.inputs(id);
        let kernel = match g.op(id) {
            Op::CausalAttentionGrad { wrt } => Kernel::AttentionGrads {
                inputs: inputs[..].try_into().expect("validated arity"),
                grads: vec![(*wrt, id)],
                kv_heads: g.ty(inputs[1]).shape[1],
            },
            Op::LinearLogprobGrad { wrt } => Kernel::LogprobGrads {
                inputs: inputs[..].try_into().expect("validated arity"),
                grads: vec![(*wrt, id)],
            },
            Op::OptimStep { rule, out } => Kernel::OptimStep {
                rule: *rule,
                numel: g.ty(id).numel(),
                prologue: ElemProgram::load(),
                prologue_inputs: vec![inputs[1]],
                state: [&inputs[..1], &inputs[2..]].concat(),
                outputs: vec![(*out, id)],
                gradient: None,
            },
            _ => continue,
        };
        match first.get(&inputs) {
            None => {
                first.insert(inputs, id);
                replaced.insert(id, kernel);
            }
            Some(lead) => {
                let more = kernel.writes()[0];
                match (replaced.get_mut(lead), kernel) {
                    (
                        Some(Kernel::AttentionGrads { grads, .. }),
                        Kernel::AttentionGrads { grads: g2, .. },
                    ) => grads.extend(g2),
                    (
                        Some(Kernel::LogprobGrads { grads, .. }),
                        Kernel::LogprobGrads { grads: g2, .. },
                    ) => grads.extend(g2),
                    (
                        Some(Kernel::OptimStep { rule, outputs, .. }),
                        Kernel::OptimStep {
                            rule: r2,
                            outputs: o2,
                            ..
                        },
                    ) if *rule == r2 => outputs.extend(o2),
                    // Same operands, other op family: a kernel of its own.
                    (_, kernel) => {
                        replaced.insert(more, kernel);
                        continue;
                    }
                }
                absorbed.insert(more);
            }
        }
    }
}

/// An optimiser step whose gradient is a permutation (a LoRA factor's
/// gradient comes out of the product transposed) that only the step reads
/// loads the permutation's source through the permuted strides instead:
/// the permutation is absorbed (written by the step when it is a graph
/// output), so no copy kernel runs for it.
fn transposed_step_gradients(
    g: &Graph,
    users: &HashMap<NodeId, Vec<NodeId>>,
    graph_outputs: &HashSet<NodeId>,
    replaced: &mut HashMap<NodeId, Kernel>,
    absorbed: &mut HashSet<NodeId>,
) {
    for kernel in replaced.values_mut() {
        let Kernel::OptimStep {
            prologue,
            prologue_inputs,
            outputs,
            gradient,
            ..
        } = kernel
        else {
            continue;
        };
        let grad = prologue_inputs[0];
        let Op::Permute { perm } = g.op(grad) else {
            continue;
        };
        let only_the_step = users
            .get(&grad)
            .is_some_and(|us| us.iter().all(|u| outputs.iter().any(|o| o.1 == *u)));
        if !only_the_step {
            continue;
        }
        let src = g.inputs(grad)[0];
        let src_strides = strides(&g.ty(src).shape);
        *prologue = ElemProgram {
            n_inputs: 1,
            instrs: vec![ElemInstr::Load {
                input: 0,
                index: Index::Broadcast {
                    shape: g.ty(grad).shape.iter().map(|&d| d as u32).collect(),
                    strides: perm.iter().map(|&a| src_strides[a] as u32).collect(),
                },
            }],
            outputs: vec![0],
        };
        *prologue_inputs = vec![src];
        *gradient = graph_outputs.contains(&grad).then_some(grad);
        absorbed.insert(grad);
    }
}

/// Whether `id` reduces its operand with `kind` over `axis` alone,
/// keeping the axis.
fn reduces_over(g: &Graph, id: NodeId, kind: ReduceKind, axis: usize) -> bool {
    matches!(g.op(id), Op::Reduce { kind: k, axes, keepdim: true } if *k == kind && axes[..] == [axis])
}

/// Matches `z = x − broadcast([stop_gradient] max(x))` with the max over
/// `axis` (the shift of a softmax): `x` and the nodes between it and `z`
/// (`z` included, `x` not).
fn max_subtracted(g: &Graph, z: NodeId, axis: usize) -> Option<(NodeId, Vec<NodeId>)> {
    if !matches!(g.op(z), Op::Binary(BinaryOp::Sub)) {
        return None;
    }
    let [x, mb] = g.inputs(z)[..] else {
        return None;
    };
    if !matches!(g.op(mb), Op::Broadcast { .. }) {
        return None;
    }
    let mut nodes = vec![z, mb];
    let mut m = g.inputs(mb)[0];
    if let Op::StopGradient = g.op(m) {
        nodes.push(m);
        m = g.inputs(m)[0];
    }
    if !reduces_over(g, m, ReduceKind::Max, axis) || g.inputs(m)[..] != [x] {
        return None;
    }
    nodes.push(m);
    Some((x, nodes))
}

/// Whether every one of `nodes` is read only by nodes in `inside` and is
/// not a graph output (so a kernel replacing them all changes nothing
/// else).
fn sealed(
    nodes: &[NodeId],
    inside: &HashSet<NodeId>,
    users: &HashMap<NodeId, Vec<NodeId>>,
    outputs: &HashSet<NodeId>,
) -> bool {
    nodes.iter().all(|n| {
        !outputs.contains(n)
            && users
                .get(n)
                .is_some_and(|us| us.iter().all(|u| inside.contains(u)))
    })
}

/// Matches the log-probs of `take` = take_along_axis(log_softmax(X),
/// targets) over the last axis, where X is the logits `h · wᵀ` (a matmul of
/// `h [N, d]` and the transpose of `w [V, d]`, reshaped to `[B, T, V]` or
/// not, optionally sliced to the first `T'` positions of each sequence) and
/// the log-softmax is the one `Graph::log_softmax` builds. Every node in
/// between must be read only inside the pattern and not be an output.
/// Returns the fused kernel and the nodes it absorbs.
fn match_linear_logprob(
    g: &Graph,
    take: NodeId,
    users: &HashMap<NodeId, Vec<NodeId>>,
    outputs: &HashSet<NodeId>,
) -> Option<(Kernel, Vec<NodeId>)> {
    let Op::TakeAlongAxis { axis } = g.op(take) else {
        return None;
    };
    let rank = g.ty(take).rank();
    let [l, targets] = g.inputs(take)[..] else {
        return None;
    };
    if *axis + 1 != rank || g.ty(targets).shape.last() != Some(&1) {
        return None;
    }
    let last = rank - 1;
    let op_is = |id: NodeId, f: &dyn Fn(&Op) -> bool| f(g.op(id));
    let ins = |id: NodeId| g.inputs(id);
    // l = z − broadcast(log(sum(exp(z)))), z = x − broadcast(max(x)).
    if !op_is(l, &|o| matches!(o, Op::Binary(BinaryOp::Sub))) {
        return None;
    }
    let [z, lb] = ins(l)[..] else { return None };
    let ls = *ins(lb).first()?;
    let s_ = *ins(ls).first()?;
    let e = *ins(s_).first()?;
    let ok = op_is(lb, &|o| matches!(o, Op::Broadcast { .. }))
        && op_is(ls, &|o| matches!(o, Op::Unary(UnaryOp::Log)))
        && reduces_over(g, s_, ReduceKind::Sum, last)
        && op_is(e, &|o| matches!(o, Op::Unary(UnaryOp::Exp)))
        && ins(e)[..] == [z];
    if !ok {
        return None;
    }
    let (x, shift) = max_subtracted(g, z, last)?;
    let mut inner = vec![l, lb, ls, s_, e, x];
    inner.extend(shift);
    // x = [slice of the first positions of] [reshape of] matmul(h, wᵀ).
    let xs = g.ty(x).shape.clone();
    let (mut logits, mut sliced_from) = (x, None);
    if let Op::Slice { start, end } = g.op(x) {
        let src = ins(x)[0];
        let ss = &g.ty(src).shape;
        let prefix = rank >= 3
            && start.iter().all(|&v| v == 0)
            && (0..rank).all(|a| a == rank - 2 || end[a] == ss[a]);
        if !prefix {
            return None;
        }
        logits = src;
        sliced_from = Some(ss[rank - 2]);
        inner.push(src);
    }
    let mut mm = logits;
    if let Op::Reshape { .. } = g.op(logits) {
        mm = ins(logits)[0];
        inner.push(mm);
    }
    let vocab_last = |id: NodeId| g.ty(id).shape.last().copied();
    if !matches!(g.op(mm), Op::MatMul)
        || g.ty(mm).rank() != 2
        || vocab_last(mm) != vocab_last(logits)
    {
        return None;
    }
    let [h, wt] = ins(mm)[..] else { return None };
    if !g.op(wt).is_matrix_transpose() || g.ty(wt).rank() != 2 {
        return None;
    }
    let w = ins(wt)[0];
    inner.push(wt);
    // Without a slice every row is scored.
    let (seq_out, seq_in) = match sliced_from {
        Some(t) => (xs[rank - 2], t),
        None => (g.ty(mm).shape[0], g.ty(mm).shape[0]),
    };
    let f32_like = |id: NodeId| matches!(g.ty(id).dtype, DType::F32 | DType::F64);
    if !f32_like(h) || !f32_like(w) || g.ty(take).dtype != g.ty(h).dtype {
        return None;
    }
    inner.sort();
    inner.dedup();
    // Nothing in between is read from outside or is an output.
    let inside: HashSet<NodeId> = inner.iter().copied().chain([take]).collect();
    if !sealed(&inner, &inside, users, outputs) {
        return None;
    }
    Some((
        Kernel::LinearLogprob {
            id: take,
            h,
            w,
            targets,
            seq_out,
            seq_in,
        },
        inner,
    ))
}

/// The largest head dimension the attention kernel takes (its cube size).
pub const MAX_ATTENTION_HEAD_DIM: usize = 128;

/// Whether `id` is a constant equal to `want` (to 1e-12 relative).
fn constant_is(g: &Graph, id: NodeId, want: f64) -> bool {
    constant_value(g, id)
        .is_some_and(|v| v == want || (v - want).abs() <= 1e-12 * want.abs().max(1.0))
}

/// Whether `mask` is the causal mask `col ≤ row` over `[T, T]`,
/// broadcast: `le(iota(axis 1), iota(axis 0))` or `ge(iota 0, iota 1)`.
fn is_causal_mask(g: &Graph, mask: NodeId, t: usize) -> bool {
    let Op::Broadcast { .. } = g.op(mask) else {
        return false;
    };
    let c = g.inputs(mask)[0];
    if g.ty(c).shape[..] != [t, t] {
        return false;
    }
    let iota_axis = |id: NodeId| match g.op(id) {
        Op::Iota { axis, .. } if g.ty(id).rank() == 2 => Some(*axis),
        _ => None,
    };
    let ops = g.inputs(c);
    match g.op(c) {
        Op::Compare(CompareOp::Le) => iota_axis(ops[0]) == Some(1) && iota_axis(ops[1]) == Some(0),
        Op::Compare(CompareOp::Ge) => iota_axis(ops[0]) == Some(0) && iota_axis(ops[1]) == Some(1),
        _ => false,
    }
}

/// Matches `model::causal_attention`: `out = matmul(P, V)` with `P` the
/// max-subtracted softmax over the last axis of `select(causal mask, (Q ·
/// Kᵀ) · 1/√hd, −∞)`. Keys and values expanded by `attention::expand_kv` (reshape →
/// broadcast → reshape of `[B, H_kv, T, hd]`) are read unexpanded when the
/// expansion has no other reader. Returns the fused kernel and the nodes it
/// absorbs (the masks and constants, shared between layers, are not).
fn match_attention(
    g: &Graph,
    out: NodeId,
    users: &HashMap<NodeId, Vec<NodeId>>,
    outputs: &HashSet<NodeId>,
) -> Option<(Kernel, Vec<NodeId>)> {
    if !matches!(g.op(out), Op::MatMul) || g.ty(out).rank() != 4 {
        return None;
    }
    let ins = |id: NodeId| g.inputs(id);
    let [p, vx] = ins(out)[..] else { return None };
    let qs = g.ty(out).shape.clone();
    let (t, hd) = (qs[2], qs[3]);
    let is = |id: NodeId, f: &dyn Fn(&Op) -> bool| f(g.op(id));
    // p = e / broadcast(sum(e)), e = exp(z), z = s2 − broadcast(max(s2)).
    if !is(p, &|o| matches!(o, Op::Binary(BinaryOp::Div))) {
        return None;
    }
    let [e, db] = ins(p)[..] else { return None };
    let den = *ins(db).first()?;
    let ok = is(db, &|o| matches!(o, Op::Broadcast { .. }))
        && reduces_over(g, den, ReduceKind::Sum, 3)
        && ins(den)[..] == [e]
        && is(e, &|o| matches!(o, Op::Unary(UnaryOp::Exp)));
    if !ok {
        return None;
    }
    let (s2, shift) = max_subtracted(g, ins(e)[0], 3)?;
    let mut inner = vec![p, db, den, e, s2];
    inner.extend(shift);
    // s2 = select(causal, sc, −∞), sc = qk · 1/√hd, qk = q · kᵀ.
    let [mask, sc, neg] = ins(s2)[..] else {
        return None;
    };
    if !matches!(g.op(s2), Op::Select)
        || !is_causal_mask(g, mask, t)
        || !constant_is(g, neg, f64::NEG_INFINITY)
        || !is(sc, &|o| matches!(o, Op::Binary(BinaryOp::Mul)))
    {
        return None;
    }
    let [qk, scale] = ins(sc)[..] else {
        return None;
    };
    if !constant_is(g, scale, 1.0 / (hd as f64).sqrt()) || !matches!(g.op(qk), Op::MatMul) {
        return None;
    }
    let [q, kt] = ins(qk)[..] else { return None };
    if !g.op(kt).is_matrix_transpose() {
        return None;
    }
    let kx = ins(kt)[0];
    inner.extend([sc, qk, kt]);
    let shape_ok = g.ty(q).shape == qs && g.ty(kx).shape == qs && g.ty(vx).shape == qs;
    let dtype_ok = [q, kx, vx]
        .iter()
        .all(|&x| matches!(g.ty(x).dtype, DType::F32 | DType::F64));
    if !shape_ok || !dtype_ok || t == 0 || hd == 0 || hd > MAX_ATTENTION_HEAD_DIM {
        return None;
    }
    let inside: HashSet<NodeId> = inner.iter().copied().chain([out]).collect();
    if !sealed(&inner, &inside, users, outputs) {
        return None;
    }
    // expand_kv: reshape(broadcast(reshape(x [B, H_kv, T, hd]))).
    let unexpand = |x: NodeId| -> Option<(NodeId, [NodeId; 2])> {
        let b = *ins(x).first()?;
        let r = *ins(b).first()?;
        let src = *ins(r).first()?;
        let chain = matches!(g.op(x), Op::Reshape { .. })
            && matches!(g.op(b), Op::Broadcast { .. })
            && matches!(g.op(r), Op::Reshape { .. });
        let ss = &g.ty(src).shape;
        let grouped = ss.len() == 4
            && ss[0] == qs[0]
            && ss[2] == t
            && ss[3] == hd
            && ss[1] > 0
            && qs[1].is_multiple_of(ss[1])
            && g.ty(r).shape[..] == [qs[0], ss[1], 1, t, hd]
            && g.ty(b).shape[..] == [qs[0], ss[1], qs[1] / ss[1], t, hd];
        (chain && grouped).then_some((src, [x, b]))
    };
    let (mut k, mut v, mut kv_heads) = (kx, vx, qs[1]);
    if let (Some((ks, ke)), Some((vs, ve))) = (unexpand(kx), unexpand(vx)) {
        let mut all = inner.clone();
        all.extend(ke.iter().chain(&ve).copied());
        let reshapes = [ins(ke[1])[0], ins(ve[1])[0]];
        all.extend(reshapes);
        let inside2: HashSet<NodeId> = all.iter().copied().chain([out]).collect();
        if g.ty(ks).shape[1] == g.ty(vs).shape[1]
            && sealed(&all[inner.len()..], &inside2, users, outputs)
        {
            (k, v, kv_heads) = (ks, vs, g.ty(ks).shape[1]);
            inner = all;
        }
    }
    inner.sort();
    inner.dedup();
    Some((
        Kernel::Attention {
            id: out,
            q,
            k,
            v,
            kv_heads,
        },
        inner,
    ))
}

impl Fuser<'_> {
    /// The values `id` reads: its operands, a folded transpose replaced by
    /// its source.
    fn operands(&self, id: NodeId) -> Vec<NodeId> {
        self.g
            .inputs(id)
            .into_iter()
            .map(|x| {
                if self.folded.contains(&x) {
                    self.g.inputs(x)[0]
                } else {
                    x
                }
            })
            .collect()
    }

    fn open_group_of(&self, id: NodeId) -> Option<usize> {
        self.group_of
            .get(&id)
            .copied()
            .filter(|&gi| self.groups[gi].is_some())
    }

    fn run(&mut self) {
        let order = std::mem::take(&mut self.order);
        for &id in &order {
            let op = self.g.op(id);
            let numel = self.g.ty(id).numel();
            if constant_value(self.g, id).is_some() {
                continue; // inlined where used, written only on demand
            }
            if self.folded.contains(&id) || self.absorbed.contains(&id) {
                continue; // its users read its source, or a fused kernel computes it
            }
            if let Some(mut kernel) = self.replaced.get(&id).cloned() {
                self.step_prologue(&mut kernel);
                for x in kernel.reads(self.g) {
                    if let Some(gi) = self.open_group_of(x) {
                        self.close(gi);
                    }
                    self.materialise(x);
                }
                self.kernels.push(kernel);
                continue;
            }
            // Operands of the new node that live in open groups.
            let mut open: Vec<usize> = Vec::new();
            for x in self.operands(id) {
                if let Some(gi) = self.open_group_of(x) {
                    if !open.contains(&gi) {
                        open.push(gi);
                    }
                }
            }
            if matches!(op, Op::StopGradient) && open.is_empty() {
                // Of a value in memory: a relabeling that shares its buffer.
                let x = self.g.inputs(id)[0];
                self.materialise(x);
                self.kernels.push(Kernel::Node(id));
            } else if fusible(op) {
                // Open groups never depend on each other (a group closes
                // before anything outside it reads it), so the groups of the
                // node's operands can merge into one — unless the kernel
                // would bind too many buffers. A broadcast reads its operand
                // through an index map, so the operand must be materialised
                // (not a register of a group): a broadcast starts a group.
                let anchored = open
                    .iter()
                    .filter(|&&gi| self.groups[gi].as_ref().unwrap().anchor.is_some())
                    .count();
                let joinable = !matches!(op, Op::Broadcast { .. })
                    && !open.is_empty()
                    && anchored <= 1
                    && open
                        .iter()
                        .all(|&gi| self.groups[gi].as_ref().unwrap().numel == numel)
                    && self.buffers(&open, id) <= MAX_KERNEL_BUFFERS;
                if joinable {
                    open.sort_by_key(|&gi| self.groups[gi].as_ref().unwrap().anchor.is_none());
                    let gi = open[0];
                    for &other in &open[1..] {
                        self.merge(gi, other);
                    }
                    self.add_member(gi, id);
                } else {
                    for gi in open {
                        self.close(gi);
                    }
                    self.new_group(id, numel, None);
                }
            } else if let Op::Reduce { .. } = op {
                let operand = self.g.inputs(id)[0];
                let mut prologue = None;
                for gi in open {
                    let only_for_reduce = {
                        let gr = self.groups[gi].as_ref().unwrap();
                        gr.anchor.is_none()
                            && gr.set.contains(&operand)
                            && self.outputs_of(gr) == vec![operand]
                            && self.users[&operand].len() == 1
                            && !self.graph_outputs.contains(&operand)
                            // its inputs, and the reduction's output
                            && self.inputs_of(&gr.members, &gr.set).len() < MAX_KERNEL_BUFFERS
                    };
                    if only_for_reduce {
                        prologue = self.groups[gi].take();
                    } else {
                        self.close(gi);
                    }
                }
                self.new_group(id, numel, Some(prologue));
            } else {
                for gi in open {
                    self.close(gi);
                }
                let operands = self.operands(id);
                for &x in &operands {
                    self.materialise(x);
                }
                if let Op::MatMul = op {
                    let ins = self.g.inputs(id);
                    self.kernels.push(Kernel::MatMul {
                        id,
                        a: operands[0],
                        b: operands[1],
                        trans_a: self.folded.contains(&ins[0]),
                        trans_b: self.folded.contains(&ins[1]),
                    });
                } else {
                    self.kernels.push(Kernel::Node(id));
                }
            }
        }
        for gi in 0..self.groups.len() {
            if self.groups[gi].is_some() {
                self.close(gi);
            }
        }
        let outputs: Vec<NodeId> = self.g.outputs().iter().map(|(_, id)| *id).collect();
        for id in outputs {
            self.materialise(id);
        }
        self.order = order;
    }

    /// Gives an optimiser step the open elementwise group that computes its
    /// gradient as prologue, when nothing outside the group reads its
    /// other values; the step then also writes the gradient if something
    /// else reads it. A constant or an inlined broadcast gradient is
    /// computed in the prologue too.
    fn step_prologue(&mut self, kernel: &mut Kernel) {
        let Kernel::OptimStep {
            numel,
            prologue,
            prologue_inputs,
            state,
            outputs,
            gradient,
            ..
        } = kernel
        else {
            return;
        };
        let grad = prologue_inputs[0];
        if *prologue != ElemProgram::load() || grad != self.g.inputs(outputs[0].1)[1] {
            return; // already given a prologue
        }
        if constant_value(self.g, grad).is_some() || self.inlined_broadcast(grad).is_some() {
            (*prologue, *prologue_inputs) = self.program(&[], &[grad], None);
            return;
        }
        let Some(gi) = self.open_group_of(grad) else {
            return;
        };
        let written: HashSet<NodeId> = outputs.iter().map(|o| o.1).collect();
        let gr = self.groups[gi].as_ref().expect("open group");
        let read_elsewhere = self.graph_outputs.contains(&grad)
            || self.users[&grad].iter().any(|u| !written.contains(u));
        let fits = self.inputs_of(&gr.members, &gr.set).len()
            + state.len()
            + outputs.len()
            + usize::from(read_elsewhere)
            <= MAX_KERNEL_BUFFERS;
        if gr.anchor.is_none() && gr.numel == *numel && self.outputs_of(gr) == [grad] && fits {
            let gr = self.groups[gi].take().expect("open group");
            self.fused_nodes += gr.members.len();
            (*prologue, *prologue_inputs) = self.program(&gr.members, &[grad], None);
            *gradient = read_elsewhere.then_some(grad);
        }
    }

    /// Writes a constant to a buffer (once) for a reader that cannot inline it.
    fn materialise(&mut self, id: NodeId) {
        let Some(v) = constant_value(self.g, id) else {
            return;
        };
        if self.materialised.insert(id) {
            self.kernels.push(Kernel::Elementwise {
                program: ElemProgram::constant(v),
                numel: self.g.ty(id).numel(),
                inputs: vec![],
                outputs: vec![id],
            });
        }
    }

    /// Moves the members of open group `from` into open group `into`.
    fn merge(&mut self, into: usize, from: usize) {
        let src = self.groups[from].take().expect("open group");
        for m in &src.members {
            self.group_of.insert(*m, into);
        }
        let dst = self.groups[into].as_mut().expect("open group");
        dst.members.extend(src.members);
        dst.set.extend(src.set);
    }

    fn add_member(&mut self, gi: usize, id: NodeId) {
        let gr = self.groups[gi].as_mut().unwrap();
        gr.members.push(id);
        gr.set.insert(id);
        self.group_of.insert(id, gi);
    }

    /// Opens a group starting at `id`; for a reduction, `Some(prologue)`.
    fn new_group(&mut self, id: NodeId, numel: usize, reduce: Option<Option<Group>>) {
        let gi = self.groups.len();
        let anchor = reduce.as_ref().map(|_| id);
        self.groups.push(Some(Group {
            numel,
            anchor,
            members: vec![id],
            set: HashSet::from([id]),
        }));
        self.group_of.insert(id, gi);
        if let Some(prologue) = reduce {
            self.prologues.insert(id, prologue);
        }
    }

    /// Nodes that members read from outside (constants are inlined; an
    /// anchor's operand belongs to its prologue).
    fn inputs_of(&self, members: &[NodeId], set: &HashSet<NodeId>) -> HashSet<NodeId> {
        let mut ins = HashSet::new();
        for &m in members {
            if matches!(self.g.op(m), Op::Reduce { .. }) {
                continue;
            }
            for x in self.g.inputs(m) {
                if !set.contains(&x) && constant_value(self.g, x).is_none() {
                    ins.insert(x);
                }
            }
        }
        ins
    }

    /// Buffers the kernel of `groups` merged with `extra` would bind: its
    /// inputs (with a reduction's prologue inputs) and its outputs, counting
    /// `extra` as an output since its users are still to come.
    fn buffers(&self, groups: &[usize], extra: NodeId) -> usize {
        let mut members = vec![extra];
        let mut set = HashSet::from([extra]);
        let mut prologue = 0;
        for &gi in groups {
            let gr = self.groups[gi].as_ref().expect("open group");
            members.extend(&gr.members);
            set.extend(&gr.set);
            if let Some(Some(p)) = gr.anchor.and_then(|a| self.prologues.get(&a)) {
                prologue = self.inputs_of(&p.members, &p.set).len();
            } else if let Some(a) = gr.anchor {
                prologue = usize::from(self.prologues.contains_key(&a));
            }
        }
        let outputs = members
            .iter()
            .filter(|&&m| {
                m == extra
                    || self.graph_outputs.contains(&m)
                    || self
                        .users
                        .get(&m)
                        .is_some_and(|us| us.iter().any(|u| !set.contains(u)))
            })
            .count();
        self.inputs_of(&members, &set).len() + prologue + outputs
    }

    /// Members whose values are needed outside the group, in member order.
    fn outputs_of(&self, gr: &Group) -> Vec<NodeId> {
        gr.members
            .iter()
            .copied()
            .filter(|m| {
                let inlined = self.inlined_broadcast(*m).is_some();
                // A reader outside the group needs the value written, unless
                // it recomputes the broadcast from its source.
                let needs_buffer =
                    |u: &NodeId| !(gr.set.contains(u) || inlined && self.inlines(*u));
                self.graph_outputs.contains(m)
                    || self
                        .users
                        .get(m)
                        .is_some_and(|us| us.iter().any(needs_buffer))
            })
            .collect()
    }

    /// For a broadcast of a non-constant value: its source and the index
    /// map. A program that reads the broadcast loads the source through
    /// that map instead, so the broadcast itself is never written out for
    /// such readers (its source is in memory: a broadcast starts a group,
    /// which reads its operand from memory).
    fn inlined_broadcast(&self, x: NodeId) -> Option<(NodeId, Index)> {
        match self.g.op(x) {
            Op::Broadcast { shape } if constant_value(self.g, x).is_none() => {
                let src = self.g.inputs(x)[0];
                Some((src, broadcast_index(&self.g.ty(src).shape, shape)))
            }
            _ => None,
        }
    }

    /// Whether `u` reads its operands through a generated program (so it
    /// can load a broadcast's source itself).
    fn inlines(&self, u: NodeId) -> bool {
        let op = self.g.op(u);
        op.is_elementwise() || matches!(op, Op::Reduce { .. })
    }

    fn close(&mut self, gi: usize) {
        let Some(gr) = self.groups[gi].take() else {
            return;
        };
        let outputs = self.outputs_of(&gr);
        match gr.anchor {
            None if outputs.is_empty() => {
                // Only broadcasts that every reader recomputes from their
                // sources: nothing to write.
                self.fused_nodes += gr.members.len();
            }
            None => {
                let (program, inputs) = self.program(&gr.members, &outputs, None);
                self.fused_nodes += gr.members.len();
                self.kernels.push(Kernel::Elementwise {
                    program,
                    numel: gr.numel,
                    inputs,
                    outputs,
                });
            }
            Some(red) => {
                let Op::Reduce { kind, axes, .. } = self.g.op(red).clone() else {
                    unreachable!("anchor is a reduction")
                };
                let operand = self.g.inputs(red)[0];
                let layout = ReduceLayout::new(&self.g.ty(operand).shape, &axes);
                let (prologue, prologue_inputs) = match self.prologues.remove(&red).flatten() {
                    Some(p) => {
                        self.fused_nodes += p.members.len();
                        self.program(&p.members, &[operand], None)
                    }
                    None if constant_value(self.g, operand).is_some()
                        || self.inlined_broadcast(operand).is_some() =>
                    {
                        self.program(&[], &[operand], None)
                    }
                    None => (ElemProgram::load(), vec![operand]),
                };
                self.fused_nodes += gr.members.len();
                let (epilogue, epilogue_inputs) = self.program(&gr.members, &outputs, Some(red));
                self.kernels.push(Kernel::Reduce {
                    kind,
                    layout,
                    prologue,
                    prologue_inputs,
                    epilogue,
                    epilogue_inputs,
                    outputs,
                });
            }
        }
    }

    /// The program computing `members` (in order) with `outputs` written.
    /// With `anchor`, that node is program input 0 (the reduced value).
    fn program(
        &self,
        members: &[NodeId],
        outputs: &[NodeId],
        anchor: Option<NodeId>,
    ) -> (ElemProgram, Vec<NodeId>) {
        let mut p = ElemProgram {
            n_inputs: 0,
            instrs: vec![],
            outputs: vec![],
        };
        let mut inputs: Vec<NodeId> = vec![];
        let mut reg: HashMap<NodeId, Reg> = HashMap::new();
        let mut loads: HashMap<(NodeId, Index), Reg> = HashMap::new();
        let push = |p: &mut ElemProgram, ins: ElemInstr| -> Reg {
            p.instrs.push(ins);
            (p.instrs.len() - 1) as Reg
        };
        let mut load = |p: &mut ElemProgram, inputs: &mut Vec<NodeId>, x: NodeId, index: Index| {
            if let Some(&r) = loads.get(&(x, index.clone())) {
                return r;
            }
            let slot = match inputs.iter().position(|&i| i == x) {
                Some(s) => s,
                None => {
                    inputs.push(x);
                    inputs.len() - 1
                }
            };
            let r = push(
                p,
                ElemInstr::Load {
                    input: slot as u32,
                    index: index.clone(),
                },
            );
            loads.insert((x, index), r);
            r
        };
        if let Some(a) = anchor {
            inputs.push(a);
            let r = load(&mut p, &mut inputs, a, Index::Same);
            reg.insert(a, r);
        }
        for &m in members {
            if Some(m) == anchor {
                continue;
            }
            let ops = self.g.inputs(m);
            let g = self.g;
            let mut operand =
                |p: &mut ElemProgram, inputs: &mut Vec<NodeId>, x: NodeId| match reg.get(&x) {
                    Some(&r) => r,
                    None => match (constant_value(g, x), self.inlined_broadcast(x)) {
                        (Some(v), _) => push(p, ElemInstr::Const(v.to_bits())),
                        (None, Some((src, index))) => load(p, inputs, src, index),
                        (None, None) => load(p, inputs, x, Index::Same),
                    },
                };
            let r = match self.g.op(m) {
                Op::Unary(u) => {
                    let a = operand(&mut p, &mut inputs, ops[0]);
                    push(&mut p, ElemInstr::Unary(*u, a))
                }
                Op::Binary(b) => {
                    let a = operand(&mut p, &mut inputs, ops[0]);
                    let c = operand(&mut p, &mut inputs, ops[1]);
                    push(&mut p, ElemInstr::Binary(*b, a, c))
                }
                Op::Compare(c) => {
                    let a = operand(&mut p, &mut inputs, ops[0]);
                    let b = operand(&mut p, &mut inputs, ops[1]);
                    push(&mut p, ElemInstr::Compare(*c, a, b))
                }
                Op::Select => {
                    let c = operand(&mut p, &mut inputs, ops[0]);
                    let a = operand(&mut p, &mut inputs, ops[1]);
                    let b = operand(&mut p, &mut inputs, ops[2]);
                    push(&mut p, ElemInstr::Select(c, a, b))
                }
                Op::Clamp { min, max } => {
                    let a = operand(&mut p, &mut inputs, ops[0]);
                    push(
                        &mut p,
                        ElemInstr::Clamp(a, min.get().to_bits(), max.get().to_bits()),
                    )
                }
                Op::Cast { to } => {
                    let a = operand(&mut p, &mut inputs, ops[0]);
                    push(&mut p, ElemInstr::Cast(*to, a))
                }
                Op::StopGradient => operand(&mut p, &mut inputs, ops[0]),
                Op::Broadcast { shape } => {
                    let src = &self.g.ty(ops[0]).shape;
                    load(&mut p, &mut inputs, ops[0], broadcast_index(src, shape))
                }
                other => unreachable!("{} is not fusible", other.name()),
            };
            reg.insert(m, r);
        }
        let g = self.g;
        p.outputs = outputs
            .iter()
            .map(|o| match reg.get(o) {
                Some(&r) => r,
                None => match self.inlined_broadcast(*o) {
                    Some((src, index)) => load(&mut p, &mut inputs, src, index),
                    None => push(
                        &mut p,
                        ElemInstr::Const(constant_value(g, *o).expect("a constant").to_bits()),
                    ),
                },
            })
            .collect();
        p.n_inputs = inputs.len() as u32;
        (p, inputs)
    }
}

/// The index map of a NumPy broadcast of `src` to `dst`.
pub fn broadcast_index(src: &[usize], dst: &[usize]) -> Index {
    if src == dst {
        return Index::Same;
    }
    let st = strides(src);
    let lead = dst.len() - src.len();
    let strides = (0..dst.len())
        .map(|a| {
            if a < lead || src[a - lead] == 1 {
                0
            } else {
                st[a - lead] as u32
            }
        })
        .collect();
    Index::Broadcast {
        shape: dst.iter().map(|&d| d as u32).collect(),
        strides,
    }
}
