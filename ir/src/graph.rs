//! The graph: typed op nodes on a petgraph `StableDiGraph`, where an edge
//! `a → b` with weight `i` says "a is operand i of b", plus named outputs.
//! Builder methods add nodes and check types as they go.

use super::op::{
    AttentionOperand, BinaryOp, CompareOp, LogprobOperand, NormOperand, Op, ReduceKind, StepOut,
    StepRule, TokenLoss, TypeError, UnaryOp,
};
use super::types::{DType, Scalar, Shape, TensorType};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use thiserror::Error;

/// Handle to a node (stable across node removal).
pub type NodeId = NodeIndex<u32>;

/// One node: its op and the type of its result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
}

/// Structural problems found when validating a graph (e.g. one read from a plan file).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum GraphError {
    #[error("node %{node}: {source}")]
    Type { node: usize, source: TypeError },
    #[error("node %{node}: stored type {stored} but its op gives {inferred}")]
    StaleType {
        node: usize,
        stored: TensorType,
        inferred: TensorType,
    },
    #[error("node %{node}: operand slots {slots:?} are not 0..n")]
    Operands { node: usize, slots: Vec<u32> },
    #[error("the graph has a cycle through node %{node}")]
    Cycle { node: usize },
    #[error("output `{name}` refers to a missing node")]
    DanglingOutput { name: String },
    #[error("two inputs are named `{name}`")]
    DuplicateInput { name: String },
}

/// A tensor program: typed nodes, operand edges and named outputs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Graph {
    graph: StableDiGraph<Node, u32, u32>,
    outputs: Vec<(String, NodeId)>,
    /// Inputs the caller gives up on every run (see [`Graph::donate`]).
    #[serde(default)]
    donated: Vec<String>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    // ---------------------------------------------------------------- access

    pub fn node(&self, id: NodeId) -> &Node {
        &self.graph[id]
    }

    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.graph[id].ty
    }

    pub fn op(&self, id: NodeId) -> &Op {
        &self.graph[id].op
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.graph.contains_node(id)
    }

    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.graph.node_indices()
    }

    /// The underlying petgraph, for algorithms and export.
    pub fn petgraph(&self) -> &StableDiGraph<Node, u32, u32> {
        &self.graph
    }

    /// Operands of a node, in slot order.
    pub fn inputs(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(u32, NodeId)> = self
            .graph
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        e.sort_unstable_by_key(|&(slot, _)| slot);
        e.into_iter().map(|(_, n)| n).collect()
    }

    /// Nodes that use `id` as an operand (once per use).
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        self.graph
            .edges_directed(id, Direction::Outgoing)
            .map(|e| e.target())
            .collect()
    }

    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
    }

    /// Marks `id` as output `name` (replacing an output of that name).
    /// Marks input `name` as given up by the caller on every run: the value
    /// passed for it must not be read after the run, and an executor may
    /// write an output into its buffer when nothing else holds it (a
    /// decode step writes one position of its KV cache in place).
    pub fn donate(&mut self, name: impl Into<String>) {
        let name = name.into();
        if !self.donated.contains(&name) {
            self.donated.push(name);
        }
    }

    /// Whether input `name` is donated (see [`Graph::donate`]).
    pub fn is_donated(&self, name: &str) -> bool {
        self.donated.iter().any(|n| n == name)
    }

    pub fn set_output(&mut self, name: impl Into<String>, id: NodeId) {
        let name = name.into();
        if let Some(o) = self.outputs.iter_mut().find(|(n, _)| *n == name) {
            o.1 = id;
        } else {
            self.outputs.push((name, id));
        }
    }

    pub fn clear_outputs(&mut self) {
        self.outputs.clear();
    }

    /// Every input's name and type, in the order the inputs were declared.
    pub fn named_inputs(&self) -> Vec<(String, TensorType)> {
        self.graph
            .node_indices()
            .filter_map(|id| match &self.graph[id].op {
                Op::Input { name, ty } => Some((name.clone(), ty.clone())),
                _ => None,
            })
            .collect()
    }

    /// Input nodes by name.
    pub fn inputs_by_name(&self) -> HashMap<String, NodeId> {
        self.graph
            .node_indices()
            .filter_map(|id| match &self.graph[id].op {
                Op::Input { name, .. } => Some((name.clone(), id)),
                _ => None,
            })
            .collect()
    }

    /// Nodes in an order where every operand precedes its users; ties are
    /// broken by node index, so the order is deterministic.
    pub fn topo_order(&self) -> Vec<NodeId> {
        let n = self.graph.node_bound();
        let mut indeg = vec![0usize; n];
        for id in self.graph.node_indices() {
            indeg[id.index()] = self.graph.edges_directed(id, Direction::Incoming).count();
        }
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = self
            .graph
            .node_indices()
            .filter(|id| indeg[id.index()] == 0)
            .map(|id| std::cmp::Reverse(id.index()))
            .collect();
        let mut order = Vec::with_capacity(self.graph.node_count());
        while let Some(std::cmp::Reverse(i)) = ready.pop() {
            let id = NodeId::new(i);
            order.push(id);
            for e in self.graph.edges_directed(id, Direction::Outgoing) {
                let t = e.target().index();
                indeg[t] -= 1;
                if indeg[t] == 0 {
                    ready.push(std::cmp::Reverse(t));
                }
            }
        }
        order
    }

    /// Re-derives every node's type from its op and operands and checks
    /// operand slots, outputs, input names and acyclicity.
    pub fn validate(&self) -> Result<(), GraphError> {
        let order = self.topo_order();
        if order.len() != self.graph.node_count() {
            let node = self
                .graph
                .node_indices()
                .find(|id| !order.contains(id))
                .map_or(0, |id| id.index());
            return Err(GraphError::Cycle { node });
        }
        let mut names = std::collections::HashSet::new();
        for &id in &order {
            let mut slots: Vec<u32> = self
                .graph
                .edges_directed(id, Direction::Incoming)
                .map(|e| *e.weight())
                .collect();
            slots.sort_unstable();
            if slots.iter().enumerate().any(|(i, &s)| s as usize != i) {
                return Err(GraphError::Operands {
                    node: id.index(),
                    slots,
                });
            }
            let inputs = self.inputs(id);
            let tys: Vec<&TensorType> = inputs.iter().map(|&i| &self.graph[i].ty).collect();
            let node = &self.graph[id];
            let inferred = node
                .op
                .infer_type(&tys)
                .map_err(|source| GraphError::Type {
                    node: id.index(),
                    source,
                })?;
            if inferred != node.ty {
                return Err(GraphError::StaleType {
                    node: id.index(),
                    stored: node.ty.clone(),
                    inferred,
                });
            }
            if let Op::Input { name, .. } = &node.op {
                if !names.insert(name.clone()) {
                    return Err(GraphError::DuplicateInput { name: name.clone() });
                }
            }
        }
        for (name, id) in &self.outputs {
            if !self.graph.contains_node(*id) {
                return Err(GraphError::DanglingOutput { name: name.clone() });
            }
        }
        Ok(())
    }

    // -------------------------------------------------------------- mutation

    /// Adds a node after checking its operands' types.
    pub fn try_add_op(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, TypeError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| &self.graph[i].ty).collect();
        let ty = op.infer_type(&tys)?;
        let id = self.graph.add_node(Node { op, ty });
        for (slot, &i) in inputs.iter().enumerate() {
            self.graph.add_edge(i, id, slot as u32);
        }
        Ok(id)
    }

    /// Adds a node; operand types that do not fit are a bug in the caller
    /// (user input is validated before graphs are built), so this panics
    /// with the type error.
    pub fn add_op(&mut self, op: Op, inputs: &[NodeId]) -> NodeId {
        match self.try_add_op(op, inputs) {
            Ok(id) => id,
            Err(e) => panic!("ill-typed graph construction: {e}"),
        }
    }

    /// Makes every user of `old` (and every output naming it) use `new`
    /// instead. Types must match.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        if old == new {
            return;
        }
        debug_assert_eq!(self.graph[old].ty, self.graph[new].ty);
        let uses: Vec<(petgraph::stable_graph::EdgeIndex<u32>, NodeId, u32)> = self
            .graph
            .edges_directed(old, Direction::Outgoing)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (e, target, slot) in uses {
            self.graph.remove_edge(e);
            self.graph.add_edge(new, target, slot);
        }
        for o in &mut self.outputs {
            if o.1 == old {
                o.1 = new;
            }
        }
    }

    /// Removes a node and its edges.
    pub fn remove(&mut self, id: NodeId) {
        self.graph.remove_node(id);
    }

    /// Replaces the op of a node in place (same result type), rewiring its operands.
    pub fn rewrite(&mut self, id: NodeId, op: Op, inputs: &[NodeId]) -> Result<(), TypeError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| &self.graph[i].ty).collect();
        let ty = op.infer_type(&tys)?;
        debug_assert_eq!(ty, self.graph[id].ty);
        let old: Vec<_> = self
            .graph
            .edges_directed(id, Direction::Incoming)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.graph.remove_edge(e);
        }
        for (slot, &i) in inputs.iter().enumerate() {
            self.graph.add_edge(i, id, slot as u32);
        }
        self.graph[id] = Node { op, ty };
        Ok(())
    }

    // --------------------------------------------------------------- builders

    pub fn input(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: impl Into<Shape>,
    ) -> NodeId {
        let ty = TensorType::new(dtype, shape);
        self.add_op(
            Op::Input {
                name: name.into(),
                ty,
            },
            &[],
        )
    }

    pub fn full(&mut self, value: f64, dtype: DType, shape: impl Into<Shape>) -> NodeId {
        let ty = TensorType::new(dtype, shape);
        self.add_op(
            Op::Full {
                value: Scalar(value),
                ty,
            },
            &[],
        )
    }

    /// A constant with the type of `like`, filled with `value`.
    pub fn full_like(&mut self, value: f64, like: NodeId) -> NodeId {
        let ty = self.ty(like).clone();
        self.add_op(
            Op::Full {
                value: Scalar(value),
                ty,
            },
            &[],
        )
    }

    pub fn literal(&mut self, values: &[f64], dtype: DType, shape: impl Into<Shape>) -> NodeId {
        let ty = TensorType::new(dtype, shape);
        let values = values.iter().map(|&v| Scalar(v)).collect();
        self.add_op(Op::Literal { values, ty }, &[])
    }

    pub fn iota(&mut self, axis: usize, dtype: DType, shape: impl Into<Shape>) -> NodeId {
        let ty = TensorType::new(dtype, shape);
        self.add_op(Op::Iota { axis, ty }, &[])
    }

    pub fn unary(&mut self, op: UnaryOp, x: NodeId) -> NodeId {
        self.add_op(Op::Unary(op), &[x])
    }

    pub fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> NodeId {
        self.add_op(Op::Binary(op), &[a, b])
    }

    pub fn compare(&mut self, op: CompareOp, a: NodeId, b: NodeId) -> NodeId {
        self.add_op(Op::Compare(op), &[a, b])
    }

    pub fn neg(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Neg, x)
    }
    pub fn exp(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Exp, x)
    }
    pub fn log(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Log, x)
    }
    pub fn sqrt(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Sqrt, x)
    }
    pub fn rsqrt(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Rsqrt, x)
    }
    pub fn tanh(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Tanh, x)
    }
    pub fn sigmoid(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Sigmoid, x)
    }
    pub fn silu(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Silu, x)
    }
    pub fn recip(&mut self, x: NodeId) -> NodeId {
        self.unary(UnaryOp::Recip, x)
    }
    pub fn add(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Add, a, b)
    }
    pub fn sub(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Mul, a, b)
    }
    pub fn div(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Div, a, b)
    }
    pub fn max(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Max, a, b)
    }
    pub fn min(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Min, a, b)
    }
    pub fn pow(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.binary(BinaryOp::Pow, a, b)
    }

    /// `x * c` for a scalar constant `c`.
    pub fn scale(&mut self, x: NodeId, c: f64) -> NodeId {
        let k = self.full_like(c, x);
        self.mul(x, k)
    }

    pub fn select(&mut self, cond: NodeId, a: NodeId, b: NodeId) -> NodeId {
        self.add_op(Op::Select, &[cond, a, b])
    }

    pub fn clamp(&mut self, x: NodeId, min: f64, max: f64) -> NodeId {
        self.add_op(
            Op::Clamp {
                min: Scalar(min),
                max: Scalar(max),
            },
            &[x],
        )
    }

    pub fn reduce(&mut self, kind: ReduceKind, x: NodeId, axes: &[usize], keepdim: bool) -> NodeId {
        self.add_op(
            Op::Reduce {
                kind,
                axes: axes.to_vec(),
                keepdim,
            },
            &[x],
        )
    }

    pub fn sum(&mut self, x: NodeId, axes: &[usize], keepdim: bool) -> NodeId {
        self.reduce(ReduceKind::Sum, x, axes, keepdim)
    }

    pub fn mean(&mut self, x: NodeId, axes: &[usize], keepdim: bool) -> NodeId {
        self.reduce(ReduceKind::Mean, x, axes, keepdim)
    }

    pub fn reduce_max(&mut self, x: NodeId, axes: &[usize], keepdim: bool) -> NodeId {
        self.reduce(ReduceKind::Max, x, axes, keepdim)
    }

    /// Sum over every axis, to a scalar.
    pub fn sum_all(&mut self, x: NodeId) -> NodeId {
        let axes: Vec<usize> = (0..self.ty(x).rank()).collect();
        self.sum(x, &axes, false)
    }

    pub fn matmul(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.add_op(Op::MatMul, &[a, b])
    }

    pub fn broadcast(&mut self, x: NodeId, shape: impl Into<Shape>) -> NodeId {
        let shape = shape.into();
        if self.ty(x).shape == shape {
            return x;
        }
        self.add_op(Op::Broadcast { shape }, &[x])
    }

    pub fn reshape(&mut self, x: NodeId, shape: impl Into<Shape>) -> NodeId {
        let shape = shape.into();
        if self.ty(x).shape == shape {
            return x;
        }
        self.add_op(Op::Reshape { shape }, &[x])
    }

    pub fn permute(&mut self, x: NodeId, perm: &[usize]) -> NodeId {
        self.add_op(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    /// Swaps the last two axes.
    pub fn transpose(&mut self, x: NodeId) -> NodeId {
        let r = self.ty(x).rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.permute(x, &perm)
    }

    pub fn slice(&mut self, x: NodeId, start: &[usize], end: &[usize]) -> NodeId {
        self.add_op(
            Op::Slice {
                start: start.to_vec(),
                end: end.to_vec(),
            },
            &[x],
        )
    }

    /// `x[start..end]` on one axis, everything on the others.
    pub fn slice_axis(&mut self, x: NodeId, axis: usize, start: usize, end: usize) -> NodeId {
        let shape = self.ty(x).shape.clone();
        let mut s = vec![0; shape.len()];
        let mut e = shape;
        s[axis] = start;
        e[axis] = end;
        self.slice(x, &s, &e)
    }

    pub fn concat(&mut self, xs: &[NodeId], axis: usize) -> NodeId {
        self.add_op(Op::Concat { axis }, xs)
    }

    pub fn pad(&mut self, x: NodeId, lo: &[usize], hi: &[usize], value: f64) -> NodeId {
        self.add_op(
            Op::Pad {
                lo: lo.to_vec(),
                hi: hi.to_vec(),
                value: Scalar(value),
            },
            &[x],
        )
    }

    pub fn take_along_axis(&mut self, x: NodeId, idx: NodeId, axis: usize) -> NodeId {
        self.add_op(Op::TakeAlongAxis { axis }, &[x, idx])
    }

    pub fn scatter_add(&mut self, base: NodeId, idx: NodeId, upd: NodeId, axis: usize) -> NodeId {
        self.add_op(Op::ScatterAdd { axis }, &[base, idx, upd])
    }

    pub fn gather(&mut self, table: NodeId, ids: NodeId) -> NodeId {
        self.add_op(Op::Gather, &[table, ids])
    }

    /// Attention of `q [B, H, 1, hd]` over cache rows `0..=pos[0]` of `k,
    /// v [B, H_kv, L, hd]` (see `Op::CachedAttention`).
    pub fn cached_attention(&mut self, q: NodeId, k: NodeId, v: NodeId, pos: NodeId) -> NodeId {
        self.add_op(Op::CachedAttention, &[q, k, v, pos])
    }

    /// `base` with `update` written at `index[0]` along `axis` (see
    /// `Op::UpdateSlice`).
    pub fn update_slice(
        &mut self,
        base: NodeId,
        update: NodeId,
        index: NodeId,
        axis: usize,
    ) -> NodeId {
        self.add_op(Op::UpdateSlice { axis }, &[base, update, index])
    }

    pub fn scatter_add_rows(&mut self, ids: NodeId, upd: NodeId, rows: usize) -> NodeId {
        self.add_op(Op::ScatterAddRows { rows }, &[ids, upd])
    }

    pub fn one_hot(&mut self, ids: NodeId, depth: usize, dtype: DType) -> NodeId {
        self.add_op(Op::OneHot { depth, dtype }, &[ids])
    }

    /// Causal softmax attention of q [B, H, T, hd] over k, v [B, H_kv, T, hd]
    /// (see `Op::CausalAttention`).
    pub fn causal_attention(&mut self, q: NodeId, k: NodeId, v: NodeId) -> NodeId {
        self.add_op(Op::CausalAttention, &[q, k, v])
    }

    /// The gradient of `Σ do ∘ causal_attention(q, k, v)` with respect to
    /// `wrt`, where `o` is that attention's value.
    pub fn causal_attention_grad(
        &mut self,
        wrt: AttentionOperand,
        qkvo: [NodeId; 4],
        d_o: NodeId,
    ) -> NodeId {
        let [q, k, v, o] = qkvo;
        self.add_op(Op::CausalAttentionGrad { wrt }, &[q, k, v, o, d_o])
    }

    /// RMSNorm of `x [..., d]` over its last axis with gain `w [d]` (see
    /// `Op::RmsNorm`).
    pub fn rms_norm(&mut self, x: NodeId, w: NodeId, eps: f64) -> NodeId {
        self.add_op(Op::RmsNorm { eps: Scalar(eps) }, &[x, w])
    }

    /// The gradient of `Σ dy ∘ rms_norm(x, w)` with respect to `wrt`.
    pub fn rms_norm_grad(
        &mut self,
        wrt: NormOperand,
        [x, w]: [NodeId; 2],
        dy: NodeId,
        eps: f64,
    ) -> NodeId {
        let eps = Scalar(eps);
        self.add_op(Op::RmsNormGrad { wrt, eps }, &[x, w, dy])
    }

    /// Value `out` of one optimiser step with `rule` on operands `ops` (see
    /// `Op::OptimStep`).
    pub fn optim_step(&mut self, rule: StepRule, out: StepOut, ops: &[NodeId]) -> NodeId {
        self.add_op(Op::OptimStep { rule, out }, ops)
    }

    /// Every value of one optimiser step, in `rule.outputs()` order.
    pub fn optim_steps(&mut self, rule: StepRule, ops: &[NodeId]) -> Vec<NodeId> {
        rule.outputs()
            .iter()
            .map(|&out| self.optim_step(rule, out, ops))
            .collect()
    }

    /// The policy loss `loss` of operands `ops` (see `Op::TokenLoss`).
    pub fn token_loss(&mut self, loss: TokenLoss, ops: &[NodeId]) -> NodeId {
        self.add_op(Op::TokenLoss { loss }, ops)
    }

    /// `gout · ∂L/∂logπ` of `L = token_loss(loss, ops)` (see
    /// `Op::TokenLossGrad`).
    pub fn token_loss_grad(&mut self, loss: TokenLoss, ops: &[NodeId], gout: NodeId) -> NodeId {
        let mut all = ops.to_vec();
        all.push(gout);
        self.add_op(Op::TokenLossGrad { loss }, &all)
    }

    /// Rotary embedding of `x [..., T, hd]` by `cos, sin [T, hd]`, or its
    /// transpose (see `Op::Rope`).
    pub fn rope(&mut self, x: NodeId, cos: NodeId, sin: NodeId, transpose: bool) -> NodeId {
        self.add_op(Op::Rope { transpose }, &[x, cos, sin])
    }

    /// Each row's log-probability of its target under the logits `h wᵀ`
    /// (see `Op::LinearLogprob`).
    pub fn linear_logprob(&mut self, h: NodeId, w: NodeId, targets: NodeId) -> NodeId {
        self.add_op(Op::LinearLogprob, &[h, w, targets])
    }

    /// The gradient of `Σ g ∘ linear_logprob(h, w, targets)` with respect
    /// to `wrt`.
    pub fn linear_logprob_grad(
        &mut self,
        wrt: LogprobOperand,
        [h, w, targets]: [NodeId; 3],
        g: NodeId,
    ) -> NodeId {
        self.add_op(Op::LinearLogprobGrad { wrt }, &[h, w, targets, g])
    }

    /// Each row's entropy of `softmax(h wᵀ)` (see `Op::LinearEntropy`).
    pub fn linear_entropy(&mut self, h: NodeId, w: NodeId) -> NodeId {
        self.add_op(Op::LinearEntropy, &[h, w])
    }

    /// The gradient of `Σ g ∘ linear_entropy(h, w)` with respect to `wrt`.
    pub fn linear_entropy_grad(
        &mut self,
        wrt: LogprobOperand,
        [h, w]: [NodeId; 2],
        g: NodeId,
    ) -> NodeId {
        self.add_op(Op::LinearEntropyGrad { wrt }, &[h, w, g])
    }

    pub fn cast(&mut self, x: NodeId, to: DType) -> NodeId {
        if self.ty(x).dtype == to {
            return x;
        }
        self.add_op(Op::Cast { to }, &[x])
    }

    pub fn stop_gradient(&mut self, x: NodeId) -> NodeId {
        self.add_op(Op::StopGradient, &[x])
    }

    /// The sum of `x` over the processes of a data-parallel run (see
    /// `Op::AllReduceSum`).
    pub fn all_reduce_sum(&mut self, x: NodeId) -> NodeId {
        self.add_op(Op::AllReduceSum, &[x])
    }

    /// An identity no pass merges or removes (see `Op::Barrier`).
    pub fn barrier(&mut self, x: NodeId, tag: u32) -> NodeId {
        self.add_op(Op::Barrier { tag }, &[x])
    }

    /// Sum of `x` over the axes that `broadcast` would expand to reach
    /// `shape` from `target`: the adjoint of broadcasting `target` → x's shape.
    pub fn unbroadcast(&mut self, x: NodeId, target: &[usize]) -> NodeId {
        let shape = self.ty(x).shape.clone();
        if shape == target {
            return x;
        }
        assert!(target.len() <= shape.len(), "unbroadcast to a higher rank");
        let off = shape.len() - target.len();
        let mut axes: Vec<usize> = (0..off).collect();
        for (i, &d) in target.iter().enumerate() {
            if d == 1 && shape[off + i] != 1 {
                axes.push(off + i);
            }
        }
        let s = if axes.is_empty() {
            x
        } else {
            self.sum(x, &axes, true)
        };
        self.reshape(s, target.to_vec())
    }

    /// Numerically stable `log_softmax` over the last axis.
    pub fn log_softmax(&mut self, x: NodeId) -> NodeId {
        let shape = self.ty(x).shape.clone();
        let last = shape.len() - 1;
        let m = self.reduce_max(x, &[last], true);
        let m = self.stop_gradient(m);
        let mb = self.broadcast(m, shape.clone());
        let z = self.sub(x, mb);
        let e = self.exp(z);
        let s = self.sum(e, &[last], true);
        let ls = self.log(s);
        let lsb = self.broadcast(ls, shape);
        self.sub(z, lsb)
    }
}
