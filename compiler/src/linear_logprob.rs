//! The linear log-prob written with ordinary ops: the reference semantics
//! of `Op::LinearLogprob` and `Op::LinearLogprobGrad`, and the graph that
//! autodiff differentiates to get the gradient of a gradient.
//!
//! The model scores tokens with the single `LinearLogprob` op, whose
//! backward is two `LinearLogprobGrad` ops that recompute the logits;
//! neither stores a `[rows, vocab]` value. Only the second derivative
//! expands the computation below, when the adjoint sweep reaches it.

use crate::ir::{Graph, LogprobOperand, NodeId};

/// Most logits (`rows × V` elements) a second-derivative expansion holds
/// per row block: 2²⁴, 64 MiB in f32.
pub const EXPANSION_LOGITS: usize = 1 << 24;

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

/// Rows of h per block when autodiff expands a `LinearLogprobGrad` of h
/// `[N, d]` and w `[V, d]` (see `autodiff::linear_logprob_grad_vjp`).
pub fn expansion_rows(h: &[usize], w: &[usize]) -> usize {
    (EXPANSION_LOGITS / w[0].max(1)).clamp(1, h[0].max(1))
}

/// `Op::LinearLogprob` with ordinary ops: logits `h wᵀ`, their
/// log-softmax, the targets' entries.
pub fn reference_logprob(g: &mut Graph, h: NodeId, w: NodeId, targets: NodeId) -> NodeId {
    let n = g.ty(h).shape[0];
    let wt = g.transpose(w);
    let z = g.matmul(h, wt);
    let lp = g.log_softmax(z);
    let idx = g.reshape(targets, vec![n, 1]);
    let picked = g.take_along_axis(lp, idx, 1);
    g.reshape(picked, vec![n])
}

/// `Op::LinearLogprobGrad { wrt }` of `(h, w, targets, g)` with ordinary
/// ops: with `C = g ∘ (onehot(targets) − softmax(h wᵀ))` (`[rows, V]`),
/// `dh = C w` and `dw = Cᵀ h`.
pub fn reference_grad(
    g: &mut Graph,
    wrt: LogprobOperand,
    [h, w, targets]: [NodeId; 3],
    grad: NodeId,
) -> NodeId {
    let n = g.ty(h).shape[0];
    let v = g.ty(w).shape[0];
    let wt = g.transpose(w);
    let z = g.matmul(h, wt);
    let lp = g.log_softmax(z);
    let p = g.exp(lp);
    let gc = g.reshape(grad, vec![n, 1]);
    let gb = g.broadcast(gc, vec![n, v]);
    let gp = g.mul(gb, p);
    // g at each row's target (the scatter checks the targets' range).
    let zero = g.full_like(0.0, z);
    let idx = g.reshape(targets, vec![n, 1]);
    let hit = g.scatter_add(zero, idx, gc, 1);
    let c = g.sub(hit, gp);
    match wrt {
        LogprobOperand::Hidden => g.matmul(c, w),
        LogprobOperand::Weight => {
            let ct = g.transpose(c);
            g.matmul(ct, h)
        }
    }
}
