//! Policy losses over per-token log-probs (`Op::TokenLoss`) and their
//! gradients with respect to the log-probs (`Op::TokenLossGrad`): each
//! token's term and slope in one pass over the operands, in the element
//! type and with the operations of the reference
//! (the compiler's `losses::{reference_loss, reference_grad}`).

use coopc_ir::{clamp_value, BinaryOp, TokenLoss};
use num_traits::Float;

/// Token `i`'s term `ℓ` and slope `∂ℓ/∂logπ` under `loss`, from operands
/// `ops` (logπ, mask, old, A, ref as `loss.arity()` says) with `cols`
/// tokens per sequence.
fn token<T: Float>(loss: TokenLoss, ops: &[&[T]], cols: usize, i: usize) -> (T, T) {
    let c = |v: f64| T::from(v).expect("a float constant");
    let Some((lo, hi)) = loss.ratio_range() else {
        return (-ops[0][i], -T::one());
    };
    let (lp, on, a) = (ops[0][i], ops[1][i] > T::zero(), ops[3][i / cols]);
    let d = if on { lp - ops[2][i] } else { T::zero() };
    let ratio = d.exp();
    let (lo, hi) = (c(lo), c(hi));
    let unclipped = ratio * a;
    let clipped = clamp_value(ratio, lo, hi) * a;
    let first = unclipped <= clipped;
    let mut value = -BinaryOp::Min.apply(unclipped, clipped);
    let passed = if ratio < lo || ratio > hi {
        T::zero()
    } else {
        a
    };
    let coef = if first { a } else { passed };
    let mut slope = -(coef * ratio);
    if loss.has_kl() {
        let beta = c(loss.kl_coef());
        let diff = if on { ops[4][i] - lp } else { T::zero() };
        let e = diff.exp();
        value = value + ((e - diff) - T::one()) * beta;
        slope = slope + (T::one() - e) * beta;
    }
    (value, if on { slope } else { T::zero() })
}

/// Each sequence's mask sum `n_b`, its "has a response token" flag as 0/1,
/// and `n_b` or 1 where it is 0.
fn sequences<T: Float>(mask: &[T], cols: usize) -> Vec<(T, T, T)> {
    mask.chunks(cols)
        .map(|row| {
            let n = row.iter().fold(T::zero(), |s, &m| s + m);
            let has = n > T::zero();
            let flag = if has { T::one() } else { T::zero() };
            (n, flag, if has { n } else { T::one() })
        })
        .collect()
}

/// `L = Σ w ∘ ℓ` of `loss` (see `Op::TokenLoss`), one element.
pub fn loss<T: Float>(loss: TokenLoss, ops: &[&[T]], cols: usize) -> Vec<T> {
    let mask = ops[1];
    let weighted = |i: usize| token(loss, ops, cols, i).0 * mask[i];
    let value = if loss.seq_mean() {
        let (mut total, mut n) = (T::zero(), T::zero());
        for (b, (_, flag, safe)) in sequences(mask, cols).into_iter().enumerate() {
            let num = (b * cols..(b + 1) * cols).fold(T::zero(), |s, i| s + weighted(i));
            total = total + num / safe * flag;
            n = n + flag;
        }
        total / n
    } else {
        let num = (0..mask.len()).fold(T::zero(), |s, i| s + weighted(i));
        num / mask.iter().fold(T::zero(), |s, &m| s + m)
    };
    vec![value]
}

/// `gout · w ∘ ∂ℓ/∂logπ [B, T]` of `loss` (see `Op::TokenLossGrad`), from
/// the loss's operands `ops` and the one-element `gout`.
pub fn grad<T: Float>(loss: TokenLoss, ops: &[&[T]], gout: T, cols: usize) -> Vec<T> {
    let mask = ops[1];
    let weight: Box<dyn Fn(usize) -> T> = if loss.seq_mean() {
        let seqs = sequences(mask, cols);
        let n = seqs.iter().fold(T::zero(), |s, q| s + q.1);
        Box::new(move |i| {
            let (_, flag, safe) = seqs[i / cols];
            mask[i] * (flag / (safe * n))
        })
    } else {
        let den = mask.iter().fold(T::zero(), |s, &m| s + m);
        Box::new(move |i| mask[i] / den)
    };
    (0..mask.len())
        .map(|i| gout * (weight(i) * token(loss, ops, cols, i).1))
        .collect()
}
