//! One optimiser step over a parameter tensor (`Op::OptimStep`): SGD,
//! momentum and AdamW with PyTorch's semantics, each value of the step in
//! one pass over the operands, in the element type and in the order of
//! operations of the reference (`coopc_ir::optim`).

use super::{for_chunks, PAR_GRAIN, PAR_MIN_ELEMS};
use coopc_ir::{StepOut, StepRule};
use num_traits::Float;

/// The value `out` of one step of `rule` on operands `ops` (θ, g, state…,
/// and for AdamW the step count `t` after this step, one element).
pub fn step<T: Float + Send + Sync>(rule: StepRule, out: StepOut, ops: &[&[T]]) -> Vec<T> {
    let c = |v: f64| T::from(v).expect("a float constant");
    let (p, g) = (ops[0], ops[1]);
    let n = p.len();
    match rule {
        StepRule::Sgd { lr } => {
            let lr = c(lr.get());
            each(n, |i| p[i] - g[i] * lr)
        }
        StepRule::Momentum { lr, mu } => {
            let (lr, mu, b) = (c(lr.get()), c(mu.get()), ops[2]);
            let buf = |i: usize| b[i] * mu + g[i];
            match out {
                StepOut::MomentumBuffer => each(n, buf),
                _ => each(n, |i| p[i] - buf(i) * lr),
            }
        }
        StepRule::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            ..
        } => {
            let (m, v, t) = (ops[2], ops[3], ops[4][0]);
            let (b1, b2) = (beta1.get(), beta2.get());
            let (cb1, cb1c, cb2, cb2c) = (c(b1), c(1.0 - b1), c(b2), c(1.0 - b2));
            let one = T::one();
            let c1 = one - c(b1).powf(t);
            let c2 = one - c(b2).powf(t);
            let (lr_t, eps) = (c(lr.get()), c(eps.get()));
            let decay = rule.decay().map(c);
            let m2 = |i: usize| m[i] * cb1 + g[i] * cb1c;
            let v2 = |i: usize| v[i] * cb2 + g[i] * g[i] * cb2c;
            let d = |i: usize| lr_t / (((v2(i) / c2).sqrt() + eps) * c1);
            match out {
                StepOut::ExpAvg => each(n, m2),
                StepOut::ExpAvgSq => each(n, v2),
                StepOut::Precond => each(n, d),
                _ => each(n, |i| {
                    let decayed = decay.map_or(p[i], |k| p[i] * k);
                    decayed - d(i) * m2(i)
                }),
            }
        }
    }
}

/// `f(i)` for every `i < n`, in parallel chunks for long tensors; `f` is
/// a type parameter, so the loop is compiled (and vectorised) for each rule.
fn each<T: Float + Send + Sync, F: Fn(usize) -> T + Sync>(n: usize, f: F) -> Vec<T> {
    let mut res = vec![T::zero(); n];
    for_chunks(&mut res, PAR_GRAIN, n >= PAR_MIN_ELEMS, |start, chunk| {
        for (i, r) in chunk.iter_mut().enumerate() {
            *r = f(start + i);
        }
    });
    res
}
