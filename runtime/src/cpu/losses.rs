//! Policy losses over per-token log-probs (`Op::TokenLoss`) and their
//! gradients with respect to the log-probs (`Op::TokenLossGrad`): each
//! token's term and slope in one pass over the operands (after one pass
//! per sequence for GSPO's sequence ratio), in the element type and with
//! the operations of the reference (the compiler's
//! `losses::{reference_loss, reference_grad}`).

use coopc_ir::{clamp_value, BinaryOp, KlEstimator, TokenAgg, TokenLoss};
use num_traits::Float;

/// Each sequence's ratio `exp(Σ_t mask δ / n_b)` (`n_b` taken as 1 where
/// it is 0) for GSPO's sequence ratio; none for the per-token ratio.
fn sequence_ratios<T: Float>(loss: TokenLoss, ops: &[&[T]], cols: usize) -> Option<Vec<T>> {
    if !loss.seq_ratio() {
        return None;
    }
    let (lp, mask, old) = (ops[0], ops[1], ops[2]);
    let ratios = sequences(mask, cols)
        .into_iter()
        .enumerate()
        .map(|(b, (_, _, safe))| {
            let num = (b * cols..(b + 1) * cols).fold(T::zero(), |s, i| {
                let d = if mask[i] > T::zero() {
                    lp[i] - old[i]
                } else {
                    T::zero()
                };
                s + d * mask[i]
            });
            (num / safe).exp()
        })
        .collect();
    Some(ratios)
}

/// Token `i`'s term `ℓ` and slope `∂ℓ/∂logπ` under `loss`, from operands
/// `ops` (logπ, mask, old, A, ref as `loss.arity()` says) with `cols`
/// tokens per sequence and the sequence ratios `seq` of GSPO's ratio.
fn token<T: Float>(
    loss: TokenLoss,
    ops: &[&[T]],
    cols: usize,
    seq: Option<&[T]>,
    i: usize,
) -> (T, T) {
    let c = |v: f64| T::from(v).expect("a float constant");
    let Some((lo, hi)) = loss.ratio_range() else {
        return (-ops[0][i], -T::one());
    };
    let (lp, on, a) = (ops[0][i], ops[1][i] > T::zero(), ops[3][i / cols]);
    let ratio = match seq {
        Some(s) => s[i / cols],
        None => (if on { lp - ops[2][i] } else { T::zero() }).exp(),
    };
    let (lo, hi) = (c(lo), c(hi));
    let (mut value, mut slope);
    if loss.cispo() {
        let coef = clamp_value(ratio, lo, hi) * a;
        value = -(coef * if on { lp } else { T::zero() });
        slope = -coef;
    } else {
        let unclipped = ratio * a;
        let clipped = clamp_value(ratio, lo, hi) * a;
        let first = unclipped <= clipped;
        value = -BinaryOp::Min.apply(unclipped, clipped);
        let passed = if ratio < lo || ratio > hi {
            T::zero()
        } else {
            a
        };
        let coef = if first { a } else { passed };
        slope = -(coef * ratio);
    }
    if loss.has_kl() {
        let beta = c(loss.kl_coef());
        let diff = if on { ops[4][i] - lp } else { T::zero() };
        let (v, s) = match loss.kl_estimator() {
            KlEstimator::K1 => (-diff, T::one()),
            KlEstimator::K2 => (diff * diff * c(0.5), -diff),
            KlEstimator::K3 => {
                let e = diff.exp();
                ((e - diff) - T::one(), T::one() - e)
            }
        };
        value = value + v * beta;
        slope = slope + s * beta;
    }
    (value, if on { slope } else { T::zero() })
}

/// Each sequence's mask sum `n_b`, its "has a response token" flag as 0/1,
/// and `n_b` or 1 where it is 0.
/// `n` as a divisor: 1 where it is 0 (no token or sequence to average
/// over: the sum it divides is then 0 too, and so is the mean).
fn safe<T: Float>(n: T) -> T {
    if n > T::zero() {
        n
    } else {
        T::one()
    }
}

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
    let seq = sequence_ratios(loss, ops, cols);
    let weighted = |i: usize| token(loss, ops, cols, seq.as_deref(), i).0 * mask[i];
    let value = match loss.agg() {
        TokenAgg::SeqMean => {
            let (mut total, mut n) = (T::zero(), T::zero());
            for (b, (_, flag, safe)) in sequences(mask, cols).into_iter().enumerate() {
                let num = (b * cols..(b + 1) * cols).fold(T::zero(), |s, i| s + weighted(i));
                total = total + num / safe * flag;
                n = n + flag;
            }
            total / safe(n)
        }
        TokenAgg::TokenMean => {
            let num = (0..mask.len()).fold(T::zero(), |s, i| s + weighted(i));
            num / safe(mask.iter().fold(T::zero(), |s, &m| s + m))
        }
        TokenAgg::SeqSum { norm } => {
            let num = (0..mask.len()).fold(T::zero(), |s, i| s + weighted(i));
            let rows = (mask.len() / cols.max(1)) as f64;
            num * T::from(1.0 / (rows * norm.get())).expect("a float constant")
        }
    };
    vec![value]
}

/// `gout · w ∘ ∂ℓ/∂logπ [B, T]` of `loss` (see `Op::TokenLossGrad`), from
/// the loss's operands `ops` and the one-element `gout`.
pub fn grad<T: Float>(loss: TokenLoss, ops: &[&[T]], gout: T, cols: usize) -> Vec<T> {
    let mask = ops[1];
    let seq = sequence_ratios(loss, ops, cols);
    let weight: Box<dyn Fn(usize) -> T> = match loss.agg() {
        TokenAgg::SeqMean => {
            let seqs = sequences(mask, cols);
            let n = safe(seqs.iter().fold(T::zero(), |s, q| s + q.1));
            Box::new(move |i| {
                let (_, flag, safe) = seqs[i / cols];
                mask[i] * (flag / (safe * n))
            })
        }
        TokenAgg::TokenMean => {
            let den = safe(mask.iter().fold(T::zero(), |s, &m| s + m));
            Box::new(move |i| mask[i] / den)
        }
        TokenAgg::SeqSum { norm } => {
            let rows = (mask.len() / cols.max(1)) as f64;
            let scale = T::from(1.0 / (rows * norm.get())).expect("a float constant");
            Box::new(move |i| mask[i] * scale)
        }
    };
    (0..mask.len())
        .map(|i| gout * (weight(i) * token(loss, ops, cols, seq.as_deref(), i).1))
        .collect()
}
