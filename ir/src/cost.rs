//! The rough arithmetic count of a graph's nodes: `2·m·n·k·batch` per
//! matmul (and per product an attention or linear log-prob op computes
//! inside), one per result element of an arithmetic elementwise op, one per
//! operand element of a reduction, one per update element of a scatter; data
//! movement is free. The scheduler reports it per program, and the trainer
//! counts what it runs with it.

use crate::{numel, Graph, NodeId, Op};

/// The rough arithmetic count (`coopc_compiler::schedule::Schedule::flops`) of running the nodes
/// `order` of `g` once: a compiled program's cost per call, without
/// scheduling it again.
pub fn program_flops(g: &Graph, order: &[NodeId]) -> u64 {
    order
        .iter()
        .fold(0u64, |acc, &id| acc.saturating_add(op_flops(g, id)))
}

/// The rough arithmetic count of one node (see `coopc_compiler::schedule::Schedule::flops`).
pub fn op_flops(g: &Graph, id: NodeId) -> u64 {
    let out = g.ty(id).numel() as u64;
    match g.op(id) {
        Op::MatMul => {
            let a = &g.ty(g.inputs(id)[0]).shape;
            let r = a.len();
            let (m, k) = (a[r - 2] as u64, a[r - 1] as u64);
            let n = g.ty(id).shape[r - 1] as u64;
            let batch = numel(&a[..r - 2]) as u64;
            2u64.saturating_mul(m)
                .saturating_mul(n)
                .saturating_mul(k)
                .saturating_mul(batch)
        }
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Clamp { .. } => out,
        // A few operations per element for each value of the step.
        Op::OptimStep { .. } => out,
        Op::Reduce { .. } => g.ty(g.inputs(id)[0]).numel() as u64,
        Op::ScatterAdd { .. } => g.ty(g.inputs(id)[2]).numel() as u64,
        Op::ScatterAddRows { .. } => g.ty(g.inputs(id)[1]).numel() as u64,
        // Products of [T, hd] rows with [T, hd] keys or values, causal half
        // not subtracted: scores and output (forward); scores, do·vᵀ and
        // one gradient product (a gradient).
        Op::CausalAttention | Op::CausalAttentionGrad { .. } => {
            let q = &g.ty(g.inputs(id)[0]).shape;
            let per = 2 * (q[0] * q[1] * q[2] * q[2] * q[3]) as u64;
            per * if matches!(g.op(id), Op::CausalAttention) {
                2
            } else {
                3
            }
        }
        // Scores and output over the whole cache (an upper bound: the kernel
        // stops at the position).
        Op::CachedAttention => {
            let k = &g.ty(g.inputs(id)[1]).shape;
            4 * (out * k[2] as u64)
        }
        // A few dozen operations per token.
        Op::TokenLoss { .. } | Op::TokenLossGrad { .. } => {
            32 * g.ty(g.inputs(id)[0]).numel() as u64
        }
        // The logits h·wᵀ (2·N·V·d); a gradient recomputes them and takes
        // one more product of the same size.
        Op::LinearLogprob
        | Op::LinearLogprobGrad { .. }
        | Op::LinearEntropy
        | Op::LinearEntropyGrad { .. } => {
            let (h, w) = (&g.ty(g.inputs(id)[0]).shape, &g.ty(g.inputs(id)[1]).shape);
            let per = 2 * (h[0] * w[0] * h[1]) as u64;
            per * if matches!(g.op(id), Op::LinearLogprob | Op::LinearEntropy) {
                1
            } else {
                2
            }
        }
        _ => 0,
    }
}
