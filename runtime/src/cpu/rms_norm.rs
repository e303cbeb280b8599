//! RMSNorm (`Op::RmsNorm`) and its gradients (`Op::RmsNormGrad`) over the
//! last axis of `x [rows, d]` with gain `w [d]`; each row's `r = 1 /
//! √(mean(x²) + eps)` is recomputed, never read from the graph.

use super::{for_chunks, rows_per_task, PAR_MIN_ELEMS};
use coopc_ir::NormOperand;
use num_traits::Float;

/// `1 / √(mean(row²) + eps)`.
fn inv_rms<T: Float>(row: &[T], eps: T) -> T {
    let ss = row.iter().fold(T::zero(), |a, &v| a + v * v);
    let n = T::from(row.len()).unwrap();
    (ss / n + eps).sqrt().recip()
}

/// `y = x · r · w` row by row.
pub fn forward<T: Float + Send + Sync>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let eps = T::from(eps).unwrap();
    let mut out = vec![T::zero(); x.len()];
    for_chunks(
        &mut out,
        rows_per_task(d) * d,
        x.len() >= PAR_MIN_ELEMS,
        |start, chunk| {
            for (i, y) in chunk.chunks_mut(d).enumerate() {
                let xr = &x[start + i * d..start + (i + 1) * d];
                let r = inv_rms(xr, eps);
                for j in 0..d {
                    y[j] = xr[j] * r * w[j];
                }
            }
        },
    );
    out
}

/// The gradient of `Σ dy ∘ forward(x, w)` with respect to `wrt`: `dx = r
/// (dy ∘ w) − x r³ Σ(dy ∘ w ∘ x) / d` per row, or `dw = Σ_rows dy ∘ x · r`
/// (rows summed in order).
pub fn grad<T: Float + Send + Sync>(
    wrt: NormOperand,
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
) -> Vec<T> {
    let d = w.len();
    let eps = T::from(eps).unwrap();
    let parallel = x.len() >= PAR_MIN_ELEMS;
    match wrt {
        NormOperand::Input => {
            let inv_d = T::from(d).unwrap().recip();
            let mut out = vec![T::zero(); x.len()];
            for_chunks(&mut out, rows_per_task(d) * d, parallel, |start, chunk| {
                for (i, dx) in chunk.chunks_mut(d).enumerate() {
                    let o = start + i * d;
                    let (xr, dyr) = (&x[o..o + d], &dy[o..o + d]);
                    let r = inv_rms(xr, eps);
                    let dot = (0..d).fold(T::zero(), |a, j| a + dyr[j] * w[j] * xr[j]);
                    let c = r * r * r * dot * inv_d;
                    for j in 0..d {
                        dx[j] = r * (dyr[j] * w[j]) - xr[j] * c;
                    }
                }
            });
            out
        }
        NormOperand::Weight => {
            let rows = x.len() / d.max(1);
            let mut r = vec![T::zero(); rows];
            for_chunks(&mut r, rows_per_task(d), parallel, |start, chunk| {
                for (i, ri) in chunk.iter_mut().enumerate() {
                    let o = (start + i) * d;
                    *ri = inv_rms(&x[o..o + d], eps);
                }
            });
            // Columns split among tasks; each sums its columns over the rows
            // in order.
            let mut out = vec![T::zero(); d];
            let cols = (PAR_MIN_ELEMS / rows.max(1)).clamp(1, d.max(1));
            for_chunks(&mut out, cols, parallel, |c0, chunk| {
                for (row, &ri) in r.iter().enumerate() {
                    let o = row * d + c0;
                    for (j, acc) in chunk.iter_mut().enumerate() {
                        *acc = *acc + dy[o + j] * (x[o + j] * ri);
                    }
                }
            });
            out
        }
    }
}
