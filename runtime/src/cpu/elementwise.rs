//! Elementwise kernels (unary, binary, compare, select, clamp, cast) and the
//! constant generators (`iota`). Scalar semantics come from the compiler's
//! `UnaryOp::apply`, `BinaryOp::apply`, `CompareOp::apply` and `clamp_value`.

use super::{PAR_GRAIN, PAR_MIN_ELEMS};
use crate::tensor::Element;
use coopc_ir::{clamp_value, BinaryOp, CompareOp, UnaryOp};
use num_traits::Float;
use rayon::prelude::*;

/// `out[i] = f(x[i])`, in parallel for large inputs.
pub fn map1<A, B, F>(x: &[A], f: F) -> Vec<B>
where
    A: Copy + Sync,
    B: Send,
    F: Fn(A) -> B + Sync + Send,
{
    if x.len() >= PAR_MIN_ELEMS {
        x.par_iter()
            .with_min_len(PAR_GRAIN)
            .map(|&a| f(a))
            .collect()
    } else {
        x.iter().map(|&a| f(a)).collect()
    }
}

/// `out[i] = f(a[i], b[i])`, in parallel for large inputs.
pub fn map2<A, B, C, F>(a: &[A], b: &[B], f: F) -> Vec<C>
where
    A: Copy + Sync,
    B: Copy + Sync,
    C: Send,
    F: Fn(A, B) -> C + Sync + Send,
{
    assert_eq!(a.len(), b.len(), "elementwise operands differ in length");
    if a.len() >= PAR_MIN_ELEMS {
        a.par_iter()
            .zip(b.par_iter())
            .with_min_len(PAR_GRAIN)
            .map(|(&x, &y)| f(x, y))
            .collect()
    } else {
        a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
    }
}

/// `out[i] = f(a[i], b[i], c[i])`, in parallel for large inputs.
pub fn map3<A, B, C, D, F>(a: &[A], b: &[B], c: &[C], f: F) -> Vec<D>
where
    A: Copy + Sync,
    B: Copy + Sync,
    C: Copy + Sync,
    D: Send,
    F: Fn(A, B, C) -> D + Sync + Send,
{
    assert!(
        a.len() == b.len() && b.len() == c.len(),
        "elementwise operands differ in length"
    );
    if a.len() >= PAR_MIN_ELEMS {
        a.par_iter()
            .zip(b.par_iter())
            .zip(c.par_iter())
            .with_min_len(PAR_GRAIN)
            .map(|((&x, &y), &z)| f(x, y, z))
            .collect()
    } else {
        a.iter()
            .zip(b)
            .zip(c)
            .map(|((&x, &y), &z)| f(x, y, z))
            .collect()
    }
}

/// Runs `$body` with `$c` bound to the op as a constant, once per variant,
/// so the per-element closure holds no `match` and the loop can vectorise;
/// the element rule stays the op's `apply`.
macro_rules! specialised {
    ($op:expr, $Enum:ident, [$($v:ident),*], |$c:ident| $body:expr) => {
        match $op {
            $($Enum::$v => {
                const $c: $Enum = $Enum::$v;
                $body
            })*
        }
    };
}
pub(crate) use specialised;

/// Float element types with a slice kernel for the exponential: f32 runs
/// [`super::vexp`] (sixteen lanes, the same bits as `f32::exp`), f64 the
/// scalar `exp`.
pub trait ExpSlice: Float + Send + Sync {
    fn exp_in_place(x: &mut [Self]);
}

impl ExpSlice for f32 {
    fn exp_in_place(x: &mut [f32]) {
        super::vexp::exp_f32_in_place(x)
    }
}

impl ExpSlice for f64 {
    fn exp_in_place(x: &mut [f64]) {
        for v in x {
            *v = v.exp();
        }
    }
}

/// `out[i] = op.apply(x[i])` for the ops whose cost is the exponential
/// (exp, sigmoid, silu), bit for bit: the exponential's operands first, then
/// one slice pass of it, then the rest of the op's rule. `false` (nothing
/// written) for the other ops.
pub fn exp_family_into<T: ExpSlice>(op: UnaryOp, x: &[T], out: &mut [T]) -> bool {
    match op {
        UnaryOp::Exp => {
            out.copy_from_slice(x);
            T::exp_in_place(out);
        }
        UnaryOp::Sigmoid | UnaryOp::Silu => {
            // UnaryOp::apply's sigmoid: e = exp(−|x|), then 1/(1+e) or e/(1+e).
            for (o, &v) in out.iter_mut().zip(x) {
                *o = -v.abs();
            }
            T::exp_in_place(out);
            let silu = op == UnaryOp::Silu;
            for (o, &v) in out.iter_mut().zip(x) {
                let e = *o;
                let d = T::one() + e;
                let s = if v >= T::zero() { T::one() / d } else { e / d };
                *o = if silu { v * s } else { s };
            }
        }
        _ => return false,
    }
    true
}

pub fn unary<T: ExpSlice>(op: UnaryOp, x: &[T]) -> Vec<T> {
    if matches!(op, UnaryOp::Exp | UnaryOp::Sigmoid | UnaryOp::Silu) {
        let mut out = vec![T::zero(); x.len()];
        if x.len() >= PAR_MIN_ELEMS {
            out.par_chunks_mut(PAR_GRAIN)
                .zip(x.par_chunks(PAR_GRAIN))
                .for_each(|(o, x)| {
                    exp_family_into(op, x, o);
                });
        } else {
            exp_family_into(op, x, &mut out);
        }
        return out;
    }
    specialised!(
        op,
        UnaryOp,
        [Neg, Exp, Log, Sqrt, Rsqrt, Tanh, Sigmoid, Silu, Abs, Sign, Recip, Sin, Cos],
        |OP| map1(x, |v| OP.apply(v))
    )
}

pub fn binary<T: Float + Send + Sync>(op: BinaryOp, a: &[T], b: &[T]) -> Vec<T> {
    specialised!(
        op,
        BinaryOp,
        [Add, Sub, Mul, Div, Max, Min, Pow],
        |OP| map2(a, b, |x, y| OP.apply(x, y))
    )
}

/// Comparison of any element type (bool orders `false < true`).
pub fn compare<T: PartialOrd + Copy + Sync>(op: CompareOp, a: &[T], b: &[T]) -> Vec<bool> {
    map2(a, b, |x, y| op.apply(x, y))
}

/// `cond ? a : b` per element.
pub fn select<T: Copy + Send + Sync>(cond: &[bool], a: &[T], b: &[T]) -> Vec<T> {
    map3(cond, a, b, |c, x, y| if c { x } else { y })
}

/// Clamp to `[lo, hi]` with the IR's scalar rule (`clamp_value`): below
/// `lo` gives `lo`, above `hi` gives `hi`, NaN stays NaN.
pub fn clamp<T: Float + Send + Sync>(x: &[T], lo: T, hi: T) -> Vec<T> {
    map1(x, |v| clamp_value(v, lo, hi))
}

/// Conversion between any two element types: through f64, which is exact for
/// every source type, so it equals a direct `as` cast (float → i32 truncates
/// toward zero and saturates, NaN → 0; bool → 0/1; number → bool is `!= 0`,
/// so NaN → true).
pub fn cast<S: Element, D: Element>(x: &[S]) -> Vec<D> {
    map1(x, |v| D::from_f64_as(v.to_f64_exact()))
}

/// `out[i_0, …] = i_axis` converted to `T`.
pub fn iota<T: Element>(shape: &[usize], axis: usize) -> Vec<T> {
    let outer: usize = shape[..axis].iter().product();
    let extent = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * extent * inner);
    for _ in 0..outer {
        for i in 0..extent {
            let v = T::from_f64_as(i as f64);
            out.resize(out.len() + inner, v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_map_matches_serial() {
        let n = PAR_MIN_ELEMS * 3 + 17;
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let par = binary(BinaryOp::Pow, &a, &b);
        let ser: Vec<f32> = a.iter().zip(&b).map(|(&x, &y)| x.powf(y)).collect();
        assert_eq!(
            par.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            ser.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn clamp_semantics() {
        let x = [-2.0f64, 0.5, 3.0, f64::NAN];
        let y = clamp(&x, -1.0, 1.0);
        assert_eq!(&y[..3], &[-1.0, 0.5, 1.0]);
        assert!(y[3].is_nan());
        // lo > hi: values below lo take lo, the rest hi.
        assert_eq!(clamp(&[0.0f32, 5.0], 2.0, 1.0), vec![2.0, 1.0]);
    }

    #[test]
    fn iota_middle_axis() {
        assert_eq!(
            iota::<i32>(&[2, 3, 2], 1),
            vec![0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
        );
    }
}
