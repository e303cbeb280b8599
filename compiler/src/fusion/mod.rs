//! Kernel fusion: partitions a graph's schedule into device kernels (the
//! kernel IR of `coopc_ir::kernel`). Chains of elementwise ops (with the
//! broadcasts that feed them) become one *elementwise program*; a reduction
//! absorbs the elementwise program that only it consumes (its prologue) and
//! the elementwise ops applied to its result (its epilogue); subgraphs that
//! match a hand-written kernel (`patterns`) become that kernel. Everything
//! else is a kernel of its own.

mod patterns;

use patterns::{
    group_gradients, match_attention, match_linear_logprob, op_kernel, transposed_step_gradients,
};

use crate::ir::{Graph, NodeId, Op};
pub use coopc_ir::kernel::*;
use std::collections::{HashMap, HashSet};

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
                    split: ReduceSplit::for_shape(layout.out_numel(), layout.red_numel()),
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
