//! The linear log-prob `log softmax(h wᵀ)[t, y_t]`, the linear entropy
//! `−Σ_v p_tv log p_tv` and their gradients, a block of rows at a time:
//! each block's logits `[rows, V]` are made by the GEMM in scratch memory
//! and reduced at once, so the whole `[N, V]` is never held. `h` is
//! `[N, d]`, `w` `[V, d]`, targets `[N]`, all row-major.

use super::index::{check, IndexError};
use super::matmul::{matmul_t, Gemm};
use crate::tensor::Element;
use coopc_ir::{BinaryOp, LogprobOperand};

/// Rows per block: about 2²⁰ logits of scratch.
fn block_rows(n: usize, v: usize) -> usize {
    ((1 << 20) / v.max(1)).clamp(1, n.max(1))
}

/// Calls `f(r0, rows, lp)` for each block of rows `r0..r0 + rows` of `h`
/// in order, with `lp` the block's log-probabilities `[rows, V]`.
fn for_each_block<T: Gemm + Element>(
    h: &[T],
    w: &[T],
    d: usize,
    mut f: impl FnMut(usize, usize, Vec<T>),
) {
    let (n, v) = (h.len() / d.max(1), w.len() / d.max(1));
    let b = block_rows(n, v);
    for r0 in (0..n).step_by(b) {
        let rows = b.min(n - r0);
        let mut z = matmul_t(&h[r0 * d..(r0 + rows) * d], false, w, true, 1, rows, d, v);
        let mut e = vec![T::zero(); v];
        for row in z.chunks_mut(v) {
            let m = row
                .iter()
                .fold(T::neg_infinity(), |a, &x| BinaryOp::Max.apply(a, x));
            // Σ exp(x − m) in order, the exponentials over the row at once.
            for (e, &x) in e.iter_mut().zip(row.iter()) {
                *e = x - m;
            }
            T::exp_in_place(&mut e);
            let lse = m + e.iter().fold(T::zero(), |a, &x| a + x).ln();
            for x in row {
                *x = *x - lse;
            }
        }
        f(r0, rows, z);
    }
}

/// Each row's log-probability of its target.
pub fn forward<T: Gemm + Element>(
    h: &[T],
    w: &[T],
    targets: &[i32],
    d: usize,
) -> Result<Vec<T>, IndexError> {
    let v = w.len() / d.max(1);
    check(targets, v)?;
    let mut out = Vec::with_capacity(targets.len());
    for_each_block(h, w, d, |r0, rows, lp| {
        for (i, &y) in targets[r0..r0 + rows].iter().enumerate() {
            out.push(lp[i * v + y as usize]);
        }
    });
    Ok(out)
}

/// The gradient of `Σ_t g[t] · logprob[t]` with respect to `h` (`[N, d]`)
/// or `w` (`[V, d]`): with `C = g ∘ (onehot(y) − softmax(h wᵀ))`, `C w` or
/// `Cᵀ h`, block by block (the blocks' `w` gradients added in order).
pub fn grad<T: Gemm + Element>(
    wrt: LogprobOperand,
    [h, w, g]: [&[T]; 3],
    targets: &[i32],
    d: usize,
) -> Result<Vec<T>, IndexError> {
    let v = w.len() / d.max(1);
    check(targets, v)?;
    Ok(grad_with(wrt, h, w, d, |r0, row, i| {
        let gt = g[r0 + i];
        T::exp_in_place(row);
        for x in row.iter_mut() {
            *x = -(gt * *x);
        }
        let y = targets[r0 + i] as usize;
        row[y] = row[y] + gt;
    }))
}

/// `dh = C w` (`[N, d]`) or `dw = Cᵀ h` (`[V, d]`) with `C` block by block:
/// `coefficients(r0, row, i)` turns row `i` of the block at `r0`, its
/// log-probabilities, into its row of `C` in place (the blocks' `w`
/// gradients added in order).
fn grad_with<T: Gemm + Element>(
    wrt: LogprobOperand,
    h: &[T],
    w: &[T],
    d: usize,
    mut coefficients: impl FnMut(usize, &mut [T], usize),
) -> Vec<T> {
    let (n, v) = (h.len() / d.max(1), w.len() / d.max(1));
    let mut out = vec![T::zero(); if wrt == LogprobOperand::Hidden { n } else { v } * d];
    for_each_block(h, w, d, |r0, rows, mut c| {
        for (i, row) in c.chunks_mut(v).enumerate() {
            coefficients(r0, row, i);
        }
        match wrt {
            LogprobOperand::Hidden => {
                let dh = matmul_t(&c, false, w, false, 1, rows, v, d);
                out[r0 * d..(r0 + rows) * d].copy_from_slice(&dh);
            }
            LogprobOperand::Weight => {
                let hb = &h[r0 * d..(r0 + rows) * d];
                let dw = matmul_t(&c, true, hb, false, 1, v, rows, d);
                for (o, x) in out.iter_mut().zip(dw) {
                    *o = *o + x;
                }
            }
        }
    });
    out
}

/// `−Σ_v p log p` of one row of log-probabilities, with `p` (its
/// exponentials) written to `p`.
fn row_entropy<T: Gemm + Element>(lp: &[T], p: &mut [T]) -> T {
    p.copy_from_slice(lp);
    T::exp_in_place(p);
    -lp.iter()
        .zip(p.iter())
        .fold(T::zero(), |a, (&x, &e)| a + e * x)
}

/// Each row's entropy of `softmax(h wᵀ)`.
pub fn entropy<T: Gemm + Element>(h: &[T], w: &[T], d: usize) -> Vec<T> {
    let v = w.len() / d.max(1);
    let mut out = Vec::with_capacity(h.len() / d.max(1));
    let mut p = vec![T::zero(); v];
    for_each_block(h, w, d, |_, _, lp| {
        out.extend(lp.chunks(v).map(|row| row_entropy(row, &mut p)))
    });
    out
}

/// The gradient of `Σ_t g[t] · entropy[t]` with respect to `h` or `w`:
/// with `C = −g ∘ p ∘ (log p + H)` per row, `C w` or `Cᵀ h`.
pub fn entropy_grad<T: Gemm + Element>(
    wrt: LogprobOperand,
    [h, w, g]: [&[T]; 3],
    d: usize,
) -> Vec<T> {
    let v = w.len() / d.max(1);
    let mut p = vec![T::zero(); v];
    grad_with(wrt, h, w, d, |r0, row, i| {
        let (gt, ent) = (g[r0 + i], row_entropy(row, &mut p));
        for (x, &e) in row.iter_mut().zip(p.iter()) {
            *x = -(gt * e * (*x + ent));
        }
    })
}
