//! The kernel IR: what the fusion pass (`coopc_compiler::fusion`) makes of
//! a schedule and every executor reads — a list of [`Kernel`]s, each an
//! elementwise program, a reduction with its fused prologue and epilogue,
//! or a hand-written kernel (products, attention, the linear log-prob, an
//! optimiser step) — plus the geometry those kernels are launched with.
//!
//! The program IR ([`ElemProgram`]) is small and serialisable: the GPU
//! backend specialises one generic kernel on it (the op list is a compile-time
//! constant of the kernel), and [`ElemProgram::eval`] is its host reference.

use crate::{
    clamp_value, strides, AttentionOperand, BinaryOp, CompareOp, DType, Graph, LogprobOperand,
    NodeId, NormOperand, Op, ReduceKind, StepOut, StepRule, UnaryOp,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
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
    /// Each register's element type, from the types of the program's
    /// inputs and outputs: a load has its input's type, an operation its
    /// operands', a comparison is bool, a cast its target; a constant takes
    /// the type of what it is combined with (or of the output it is), and a
    /// constant combined only with constants is f64 (which represents every
    /// value of the other types exactly). `None` when an instruction is on
    /// types that do not fit together (an operation on mixed or non-float
    /// types, a load or an output of the wrong type).
    pub fn register_types(&self, inputs: &[DType], outputs: &[DType]) -> Option<Vec<DType>> {
        let n = self.instrs.len();
        let mut ty: Vec<Option<DType>> = vec![None; n];
        for (&o, &t) in self.outputs.iter().zip(outputs) {
            if matches!(self.instrs[o as usize], ElemInstr::Const(_)) {
                ty[o as usize] = Some(t);
            }
        }
        // Forward from loads and casts, backward into constants, until
        // nothing changes (constants are the only registers that need the
        // backward direction).
        fn set(ty: &mut [Option<DType>], r: u32, t: Option<DType>, changed: &mut bool) {
            if let (None, Some(t)) = (ty[r as usize], t) {
                ty[r as usize] = Some(t);
                *changed = true;
            }
        }
        for _ in 0..=n {
            let mut changed = false;
            let c = &mut changed;
            for (i, ins) in self.instrs.iter().enumerate() {
                let i = i as u32;
                let at = |ty: &[Option<DType>], r: &u32| ty[*r as usize];
                match ins {
                    ElemInstr::Load { input, .. } => {
                        set(&mut ty, i, inputs.get(*input as usize).copied(), c)
                    }
                    ElemInstr::Const(_) => {}
                    ElemInstr::Unary(_, a) | ElemInstr::Clamp(a, ..) => {
                        let t = at(&ty, a);
                        set(&mut ty, i, t, c);
                        let t = at(&ty, &i);
                        set(&mut ty, *a, t, c);
                    }
                    ElemInstr::Binary(_, a, b) | ElemInstr::Select(_, a, b) => {
                        let t = at(&ty, a).or(at(&ty, b));
                        set(&mut ty, i, t, c);
                        let t = at(&ty, &i);
                        set(&mut ty, *a, t, c);
                        set(&mut ty, *b, t, c);
                        if let ElemInstr::Select(cond, ..) = ins {
                            set(&mut ty, *cond, Some(DType::Bool), c);
                        }
                    }
                    ElemInstr::Compare(_, a, b) => {
                        set(&mut ty, i, Some(DType::Bool), c);
                        let t = at(&ty, b);
                        set(&mut ty, *a, t, c);
                        let t = at(&ty, a);
                        set(&mut ty, *b, t, c);
                    }
                    ElemInstr::Cast(to, _) => set(&mut ty, i, Some(*to), c),
                }
            }
            if !changed {
                break;
            }
        }
        let types: Vec<DType> = ty.into_iter().map(|t| t.unwrap_or(DType::F64)).collect();
        let float = |r: &u32| types[*r as usize].is_float();
        let ok = self.instrs.iter().enumerate().all(|(i, ins)| match ins {
            ElemInstr::Load { input, .. } => inputs.get(*input as usize) == Some(&types[i]),
            ElemInstr::Const(_) | ElemInstr::Cast(..) => true,
            ElemInstr::Unary(_, a) | ElemInstr::Clamp(a, ..) => {
                float(a) && types[*a as usize] == types[i]
            }
            ElemInstr::Binary(_, a, b) => {
                float(a) && types[*a as usize] == types[i] && types[*b as usize] == types[i]
            }
            ElemInstr::Compare(_, a, b) => types[*a as usize] == types[*b as usize],
            ElemInstr::Select(c, a, b) => {
                types[*c as usize] == DType::Bool
                    && types[*a as usize] == types[i]
                    && types[*b as usize] == types[i]
            }
        }) && self
            .outputs
            .iter()
            .zip(outputs)
            .all(|(&o, &t)| types[o as usize] == t);
        ok.then_some(types)
    }

    /// This program with bf16 storage spelled out for an executor that
    /// holds bf16 values as f32 (the CPU executor's rule, made explicit):
    /// every bf16 register an instruction computes is followed by a
    /// `Cast(Bf16)` (rounding to nearest, ties to even) that takes its
    /// place, bf16 constants are rounded, and so are the loads of the
    /// `round_loads` slot (an epilogue's reduced value, accumulated in f32).
    /// Loads of other slots are bf16 values already. `types` are
    /// [`ElemProgram::register_types`]; a program without bf16 registers
    /// comes back unchanged.
    pub fn rounding_bf16(&self, types: &[DType], round_loads: Option<u32>) -> ElemProgram {
        if !types.contains(&DType::Bf16) {
            return self.clone();
        }
        let mut instrs = Vec::with_capacity(self.instrs.len() * 2);
        let mut map: Vec<Reg> = Vec::with_capacity(self.instrs.len());
        for (ins, &t) in self.instrs.iter().zip(types) {
            let m = |r: &Reg| map[*r as usize];
            let (ins, round) = match ins {
                ElemInstr::Load { input, index } => (
                    ElemInstr::Load {
                        input: *input,
                        index: index.clone(),
                    },
                    round_loads == Some(*input),
                ),
                ElemInstr::Const(bits) if t == DType::Bf16 => {
                    let v = crate::round_bf16(f64::from_bits(*bits) as f32);
                    (ElemInstr::Const(f64::from(v).to_bits()), false)
                }
                ElemInstr::Const(bits) => (ElemInstr::Const(*bits), false),
                ElemInstr::Unary(op, a) => (ElemInstr::Unary(*op, m(a)), true),
                ElemInstr::Binary(op, a, b) => (ElemInstr::Binary(*op, m(a), m(b)), true),
                ElemInstr::Compare(op, a, b) => (ElemInstr::Compare(*op, m(a), m(b)), true),
                ElemInstr::Select(c, a, b) => (ElemInstr::Select(m(c), m(a), m(b)), true),
                ElemInstr::Clamp(a, lo, hi) => (ElemInstr::Clamp(m(a), *lo, *hi), true),
                // A cast to bf16 rounds by itself.
                ElemInstr::Cast(to, a) => (ElemInstr::Cast(*to, m(a)), false),
            };
            instrs.push(ins);
            if round && t == DType::Bf16 {
                instrs.push(ElemInstr::Cast(DType::Bf16, instrs.len() as Reg - 1));
            }
            map.push(instrs.len() as Reg - 1);
        }
        ElemProgram {
            n_inputs: self.n_inputs,
            instrs,
            outputs: self.outputs.iter().map(|o| map[*o as usize]).collect(),
        }
    }

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
        DType::Bf16 => crate::round_bf16(v as f32) as f64,
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

/// How a reduction's outputs are spread over the device's units: decided
/// by the fuser from the reduction's shape, read by the device executor and
/// by the source emitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceSplit {
    /// One cube per output, its units folding the row cooperatively.
    CubePerOutput,
    /// One unit per output, folding its row alone.
    UnitPerOutput,
}

impl ReduceSplit {
    /// A cube per output when rows are long, or when there are too few
    /// outputs to fill a GPU with one unit each.
    pub fn for_shape(n_out: usize, n_red: usize) -> ReduceSplit {
        if n_red >= 256 || (n_red >= 32 && n_out <= 16_384) {
            ReduceSplit::CubePerOutput
        } else {
            ReduceSplit::UnitPerOutput
        }
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
        split: ReduceSplit,
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
        /// Vocabulary rows per pass of the backward ([`device_chunk`]).
        chunk: usize,
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
    /// `linear_logprob::device_backward_scratch`); the linear entropy's
    /// (`device_entropy_scratch`); the per-row 1/rms of an RMSNorm gain's
    /// gradient.
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
                    device_forward_scratch(n(id), g.ty(*w).shape[0])
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
                device_backward_scratch(n, d, vocab)
            }
            // Each row's 1/rms, for the gain's gradient.
            Kernel::Node(id) => match g.op(*id) {
                Op::LinearEntropy | Op::LinearEntropyGrad { .. } => {
                    let ins = g.inputs(*id);
                    let [n, d] = [0, 1].map(|a| g.ty(ins[0]).shape[a]);
                    let vocab = g.ty(ins[1]).shape[0];
                    let wrt = match g.op(*id) {
                        Op::LinearEntropyGrad { wrt } => Some(*wrt),
                        _ => None,
                    };
                    device_entropy_scratch(n, d, vocab, wrt)
                }
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
    /// This schedule with the bf16 storage of its elementwise programs
    /// spelled out ([`ElemProgram::rounding_bf16`]): the programs of
    /// elementwise kernels, and the prologues and epilogues of reductions
    /// and optimiser steps, for an executor that holds bf16 values as f32.
    /// The other kernels' bf16 results are that executor's to round. A
    /// schedule without bf16 values comes back unchanged.
    pub fn rounding_bf16(&self, g: &Graph) -> FusedSchedule {
        let dtypes = |ids: &[NodeId]| ids.iter().map(|&i| g.ty(i).dtype).collect::<Vec<_>>();
        let round = |p: &ElemProgram, ins: &[DType], outs: &[DType], slot: Option<u32>| match p
            .register_types(ins, outs)
        {
            Some(types) => p.rounding_bf16(&types, slot),
            None => p.clone(),
        };
        let mut rounded = self.clone();
        for k in &mut rounded.kernels {
            match k {
                Kernel::Elementwise {
                    program,
                    inputs,
                    outputs,
                    ..
                } => *program = round(program, &dtypes(inputs), &dtypes(outputs), None),
                Kernel::Reduce {
                    prologue,
                    prologue_inputs,
                    epilogue,
                    epilogue_inputs,
                    outputs,
                    ..
                } => {
                    // Epilogue slot 0 is the reduced value, accumulated in
                    // f32 and rounded where it is stored.
                    let red = g.ty(epilogue_inputs[0]).dtype;
                    let slot = (red == DType::Bf16).then_some(0);
                    *prologue = round(prologue, &dtypes(prologue_inputs), &[red], None);
                    *epilogue = round(epilogue, &dtypes(epilogue_inputs), &dtypes(outputs), slot);
                }
                Kernel::OptimStep {
                    prologue,
                    prologue_inputs,
                    state,
                    ..
                } => {
                    let t = g.ty(state[0]).dtype;
                    *prologue = round(prologue, &dtypes(prologue_inputs), &[t], None);
                }
                _ => {}
            }
        }
        rounded
    }

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

/// The largest head dimension the attention kernel takes (its cube size).
pub const MAX_ATTENTION_HEAD_DIM: usize = 128;
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

// Geometry of the fused linear log-prob's device kernels.

/// Elements of the coefficient chunk `[N, chunk]` the device's log-prob
/// gradients hold at once (64 MiB in f32).
pub const DEVICE_CHUNK_ELEMS: usize = 1 << 24;

/// Vocabulary rows per chunk of the device's log-prob gradients for `n`
/// tokens and `vocab` rows: a multiple of 64 (at least 64) with `n ·
/// chunk ≤ DEVICE_CHUNK_ELEMS` where possible, at most `vocab`.
pub fn device_chunk(n: usize, vocab: usize) -> usize {
    let c = (DEVICE_CHUNK_ELEMS / n.max(1)) / 64 * 64;
    c.max(64).min(vocab.max(1))
}

/// Elements of device scratch a log-prob forward of `n` tokens (the rows
/// of h) over `vocab` rows holds beyond its log-probs and log-sum-exp, with
/// either matmul: coopc's fused forward keeps a partial (max, Σexp) per
/// token and span and the target logits; CubeCL's chunked forward a
/// running (max, Σexp) and the target logit per token, and one chunk of
/// logits `[n, chunk]`.
pub fn device_forward_scratch(n: usize, vocab: usize) -> usize {
    let spans = forward_splits(n, vocab).1;
    let chunk = device_chunk(n, vocab);
    ((2 * spans + 1) * n).max(3 * n + n * chunk)
}

/// Elements of device scratch the log-prob gradients of `n` tokens, `d`
/// features and `vocab` rows hold beyond the gradients asked for: the
/// forward's log-probs and log-sum-exp and its scratch, then one chunk of
/// coefficients `[n, chunk]` and, where CubeCL's matmul adds dh's later
/// chunks through a temporary, `[n, d]` more.
pub fn device_backward_scratch(n: usize, d: usize, vocab: usize) -> usize {
    let chunk = device_chunk(n, vocab);
    let temp = if vocab > chunk { n * d } else { 0 };
    2 * n + device_forward_scratch(n, vocab).max(n * chunk + temp)
}

/// Elements of device scratch a linear entropy of `n` rows over `vocab`
/// rows holds beyond its output: a running (max, Σexp, Σexp·logit) and the
/// log-sum-exp per row and one chunk of logits `[n, chunk]`; for its
/// gradient with respect to `grad`, also the entropy, then the
/// coefficients' chunk (and for dh, where CubeCL's matmul adds its later
/// chunks through a temporary, `[n, d]` more).
pub fn device_entropy_scratch(
    n: usize,
    d: usize,
    vocab: usize,
    grad: Option<LogprobOperand>,
) -> usize {
    let chunk = device_chunk(n, vocab);
    let forward = 4 * n + n * chunk;
    let Some(wrt) = grad else {
        return forward;
    };
    let temp = if wrt == LogprobOperand::Hidden && vocab > chunk {
        n * d
    } else {
        0
    };
    (n + forward).max(2 * n + n * chunk + temp)
}

/// Vocabulary rows per split of the device's register-blocked log-prob
/// forward for `n` tokens: the vocabulary is cut into spans of a multiple
/// of 64 rows so that about 256 cubes (64 tokens × one span each) run at
/// once; returns `(span, splits)`. Its scratch is `2 · splits · n` floats.
pub fn forward_splits(n: usize, vocab: usize) -> (usize, usize) {
    let token_blocks = n.div_ceil(64).max(1);
    let tiles = vocab.div_ceil(64).max(1);
    let want = 256usize.div_ceil(token_blocks).clamp(1, tiles);
    let span = tiles.div_ceil(want) * 64;
    (span, vocab.max(1).div_ceil(span))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round_bf16;

    fn load(input: u32) -> ElemInstr {
        ElemInstr::Load {
            input,
            index: Index::Same,
        }
    }

    /// `x·x + x·c` of a bf16 input, `c` a constant that is not a bf16
    /// number.
    fn square_plus_scaled() -> ElemProgram {
        ElemProgram {
            n_inputs: 1,
            instrs: vec![
                load(0),
                ElemInstr::Binary(BinaryOp::Mul, 0, 0),
                ElemInstr::Const(1.001f64.to_bits()),
                ElemInstr::Binary(BinaryOp::Mul, 0, 2),
                ElemInstr::Binary(BinaryOp::Add, 1, 3),
            ],
            outputs: vec![4],
        }
    }

    #[test]
    fn register_types_follow_loads_casts_and_constants() {
        let p = square_plus_scaled();
        let t = p.register_types(&[DType::Bf16], &[DType::Bf16]).unwrap();
        assert_eq!(t, vec![DType::Bf16; 5]);
        // An output of the wrong type, or a load of one, is refused.
        assert!(p.register_types(&[DType::Bf16], &[DType::F32]).is_none());
        assert!(p.register_types(&[DType::I32], &[DType::I32]).is_none());
    }

    #[test]
    fn rounding_bf16_rounds_each_computed_register_and_bf16_constants() {
        let p = square_plus_scaled();
        let t = p.register_types(&[DType::Bf16], &[DType::Bf16]).unwrap();
        let r = p.rounding_bf16(&t, None);
        // A rounding after each of the three operations; the load is not
        // rounded again and the constant is rounded in place.
        let casts = r
            .instrs
            .iter()
            .filter(|i| matches!(i, ElemInstr::Cast(DType::Bf16, _)))
            .count();
        assert_eq!(casts, 3, "{r:?}");
        assert!(r
            .instrs
            .contains(&ElemInstr::Const(f64::from(round_bf16(1.001)).to_bits())));
        // 1 + 2⁻⁷ is a bf16 number whose square and product with 1.001 are
        // not.
        let x = 1.0 + 2f32.powi(-7);
        let want = round_bf16(round_bf16(x * x) + round_bf16(x * round_bf16(1.001)));
        assert_eq!(r.eval(0, |_, _| f64::from(x))[0], f64::from(want));
        assert_ne!(p.eval(0, |_, _| f64::from(x))[0], f64::from(want));
        // Without bf16 registers the program is unchanged.
        let t32 = p.register_types(&[DType::F32], &[DType::F32]).unwrap();
        assert_eq!(p.rounding_bf16(&t32, None), p);
    }

    #[test]
    fn rounding_bf16_rounds_the_loads_of_a_reduced_slot() {
        // An epilogue `red + b`: the reduced value (slot 0) arrives
        // unrounded, and rounding it first changes the sum's rounding.
        let p = ElemProgram {
            n_inputs: 2,
            instrs: vec![load(0), load(1), ElemInstr::Binary(BinaryOp::Add, 0, 1)],
            outputs: vec![2],
        };
        let t = p
            .register_types(&[DType::Bf16, DType::Bf16], &[DType::Bf16])
            .unwrap();
        // bf16's ulp at 1 is 2⁻⁷: red = 1 + 0.625 ulp, b = −0.25 ulp.
        let (red, b) = (1.0 + 5.0 * 2f64.powi(-10), -(2f64.powi(-9)));
        let at = |p: &ElemProgram| p.eval(0, |slot, _| if slot == 0 { red } else { b })[0];
        let ulp = 2f64.powi(-7);
        assert_eq!(at(&p.rounding_bf16(&t, Some(0))), 1.0 + ulp);
        assert_eq!(at(&p.rounding_bf16(&t, None)), 1.0);
    }
}
