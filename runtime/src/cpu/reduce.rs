//! Sum / max / mean over an arbitrary set of axes. Every output element is
//! folded left to right over its reduced elements in row-major order, so the
//! result does not depend on the layout path taken or on threading.

use super::movement::permute;
use super::{for_chunks, PAR_GRAIN, PAR_MIN_ELEMS};
use crate::tensor::Element;
use coopc_ir::{BinaryOp, ReduceKind};
use num_traits::Float;

/// Reduces `x` (shape `shape`) over `axes` (distinct, in range). The output
/// holds the kept axes in their original order; `keepdim` only changes the
/// shape, not the data, so it is not an argument here.
///
/// Each output is `((e ⊕ x_0) ⊕ x_1) ⊕ …` over its reduced elements in
/// row-major order, where ⊕ is `+` with `e = 0` for sum and mean, and the
/// IR's NaN-propagating `max` with `e = -inf` for max (so an empty reduction
/// gives `e`). Mean divides the sum by the element count (0/0 = NaN when
/// empty). This is the accumulation the constant folder uses, so folded and
/// executed sums agree bit for bit (including the sign of zero).
pub fn reduce<T>(kind: ReduceKind, x: &[T], shape: &[usize], axes: &[usize]) -> Vec<T>
where
    T: Float + Element,
{
    let reduced = |d: usize| axes.contains(&d);
    let out_n: usize = (0..shape.len())
        .filter(|&d| !reduced(d))
        .map(|d| shape[d])
        .product();
    let count: usize = axes.iter().map(|&d| shape[d]).product();

    let identity = match kind {
        ReduceKind::Sum | ReduceKind::Mean => T::zero(),
        ReduceKind::Max => T::neg_infinity(),
    };
    let mut out = if out_n == 0 {
        Vec::new()
    } else if count == 0 {
        vec![identity; out_n]
    } else {
        let combine = move |a: T, b: T| match kind {
            ReduceKind::Sum | ReduceKind::Mean => a + b,
            ReduceKind::Max => BinaryOp::Max.apply(a, b),
        };
        reduce_nonempty(x, shape, axes, identity, combine)
    };
    if kind == ReduceKind::Mean {
        let n = T::from_f64_as(count as f64);
        for v in &mut out {
            *v = *v / n;
        }
    }
    out
}

/// The fold for a non-empty input: picks a layout path and folds.
fn reduce_nonempty<T, F>(x: &[T], shape: &[usize], axes: &[usize], init: T, combine: F) -> Vec<T>
where
    T: Float + Element,
    F: Fn(T, T) -> T + Sync + Send + Copy,
{
    // Blocks of consecutive axes with the same role; extent-1 axes play no
    // part in the layout and are dropped.
    let mut blocks: Vec<(usize, bool)> = Vec::new();
    for (d, &e) in shape.iter().enumerate() {
        if e == 1 {
            continue;
        }
        let r = axes.contains(&d);
        match blocks.last_mut() {
            Some((pe, pr)) if *pr == r => *pe *= e,
            _ => blocks.push((e, r)),
        }
    }
    let reduced_blocks = blocks.iter().filter(|b| b.1).count();
    match reduced_blocks {
        // Nothing (or only extent-1 axes) to reduce: each output folds one input.
        0 => fold_blocks(x, x.len(), 1, 1, init, combine),
        // One contiguous reduced block: view as [outer, red, inner].
        1 => {
            let pos = blocks.iter().position(|b| b.1).unwrap_or(0);
            let outer: usize = blocks[..pos].iter().map(|b| b.0).product();
            let red = blocks[pos].0;
            let inner: usize = blocks[pos + 1..].iter().map(|b| b.0).product();
            fold_blocks(x, outer, red, inner, init, combine)
        }
        // Scattered reduced axes: move them to the back (kept axes first, in
        // order, then reduced axes in ascending order) and fold rows.
        _ => {
            let mut perm: Vec<usize> = (0..shape.len()).filter(|d| !axes.contains(d)).collect();
            let mut red_axes: Vec<usize> = axes.to_vec();
            red_axes.sort_unstable();
            perm.extend_from_slice(&red_axes);
            let xp = permute(x, shape, &perm);
            let red: usize = red_axes.iter().map(|&d| shape[d]).product();
            fold_blocks(&xp, xp.len() / red, red, 1, init, combine)
        }
    }
}

/// `out[o, i] = ((init ⊕ x[o, 0, i]) ⊕ x[o, 1, i]) ⊕ … ⊕ x[o, red-1, i]` for
/// `x` viewed as `[outer, red, inner]`.
fn fold_blocks<T, F>(x: &[T], outer: usize, red: usize, inner: usize, init: T, combine: F) -> Vec<T>
where
    T: Float + Element,
    F: Fn(T, T) -> T + Sync + Send + Copy,
{
    debug_assert_eq!(x.len(), outer * red * inner);
    let mut out = vec![T::zero(); outer * inner];
    let parallel = x.len() >= PAR_MIN_ELEMS;
    if inner == 1 {
        // Contiguous rows.
        let per_task = PAR_GRAIN.div_ceil(red).max(1);
        for_chunks(&mut out, per_task, parallel, |start, chunk| {
            for (j, o) in chunk.iter_mut().enumerate() {
                let row = &x[(start + j) * red..(start + j + 1) * red];
                *o = row.iter().fold(init, |acc, &v| combine(acc, v));
            }
        });
    } else {
        // Strided columns: fold whole rows of `inner` into a running row, so
        // the inner loop is contiguous. A task owns a span of outputs, which
        // may cross several `o`.
        let per_task = PAR_GRAIN.div_ceil(red).max(256);
        for_chunks(&mut out, per_task, parallel, |start, chunk| {
            let end = start + chunk.len();
            let mut pos = start;
            while pos < end {
                let o = pos / inner;
                let i0 = pos % inner;
                let i1 = inner.min(i0 + (end - pos));
                let dst = &mut chunk[pos - start..pos - start + (i1 - i0)];
                let base = o * red * inner;
                dst.fill(init);
                for r in 0..red {
                    let src = &x[base + r * inner + i0..base + r * inner + i1];
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = combine(*d, v);
                    }
                }
                pos += i1 - i0;
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::unravel;
    use coopc_ir::numel;

    /// Reference: for each output, walk all inputs in row-major order.
    fn naive(kind: ReduceKind, x: &[f64], shape: &[usize], axes: &[usize]) -> Vec<f64> {
        let kept: Vec<usize> = (0..shape.len()).filter(|d| !axes.contains(d)).collect();
        let out_shape: Vec<usize> = kept.iter().map(|&d| shape[d]).collect();
        let mut acc: Vec<Option<f64>> = vec![None; numel(&out_shape)];
        let count: usize = axes.iter().map(|&d| shape[d]).product();
        for (f, &v) in x.iter().enumerate() {
            let idx = unravel(f, shape);
            let oi = kept.iter().fold(0, |a, &d| a * shape[d] + idx[d]);
            let a = acc[oi].unwrap_or(match kind {
                ReduceKind::Max => f64::NEG_INFINITY,
                _ => 0.0,
            });
            acc[oi] = Some(match kind {
                ReduceKind::Max => BinaryOp::Max.apply(a, v),
                _ => a + v,
            });
        }
        acc.into_iter()
            .map(|a| match (a, kind) {
                (None, ReduceKind::Max) => f64::NEG_INFINITY,
                (None, ReduceKind::Mean) => f64::NAN,
                (None, ReduceKind::Sum) => 0.0,
                (Some(a), ReduceKind::Mean) => a / count as f64,
                (Some(a), _) => a,
            })
            .collect()
    }

    #[test]
    fn every_axis_subset_matches_naive() {
        for shape in [vec![3, 1, 4, 5], vec![2, 3, 2, 7], vec![40, 9, 30, 5]] {
            let n = numel(&shape);
            let x: Vec<f64> = (0..n)
                .map(|i| ((i * 7919) % 1013) as f64 / 97.0 - 5.0)
                .collect();
            for mask in 0u32..16 {
                let axes: Vec<usize> = (0..4).filter(|d| mask & (1 << d) != 0).collect();
                for kind in [ReduceKind::Sum, ReduceKind::Max, ReduceKind::Mean] {
                    let got = reduce(kind, &x, &shape, &axes);
                    let want = naive(kind, &x, &shape, &axes);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{kind:?} over {axes:?} of {shape:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_reductions() {
        let x: Vec<f32> = Vec::new();
        assert_eq!(reduce(ReduceKind::Sum, &x, &[3, 0], &[1]), vec![0.0; 3]);
        assert_eq!(
            reduce(ReduceKind::Max, &x, &[3, 0], &[1]),
            vec![f32::NEG_INFINITY; 3]
        );
        assert!(reduce(ReduceKind::Mean, &x, &[3, 0], &[1])
            .iter()
            .all(|v| v.is_nan()));
        assert!(reduce(ReduceKind::Sum, &x, &[0, 3], &[1]).is_empty());
    }

    #[test]
    fn sum_starts_from_positive_zero() {
        // 0 + (-0) = +0, as in the constant folder.
        let x = [-0.0f32, -0.0];
        let r = reduce(ReduceKind::Sum, &x, &[2], &[0]);
        assert_eq!(r[0].to_bits(), 0.0f32.to_bits());
        let r = reduce(ReduceKind::Max, &x, &[2], &[0]);
        assert_eq!(r[0].to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn max_propagates_nan() {
        let x = [1.0f32, f32::NAN, 3.0, 2.0];
        let r = reduce(ReduceKind::Max, &x, &[2, 2], &[1]);
        assert!(r[0].is_nan());
        assert_eq!(r[1], 3.0);
    }
}
