//! CPU kernels of the reference executor, one module per op family. Kernels
//! work on plain row-major slices plus shapes and know nothing of the graph.
//!
//! Parallel kernels split their output into fixed chunks and compute every
//! output element with the same sequence of operations as the serial path,
//! so results are bitwise identical whatever the number of threads.

pub mod attention;
pub mod elementwise;
pub mod index;
pub mod linear_logprob;
pub mod losses;
pub mod matmul;
pub mod movement;
pub mod optim;
pub mod reduce;
pub mod rms_norm;
pub mod rope;
pub mod vexp;

use rayon::prelude::*;

/// Below this many elements of work a kernel runs serially.
pub const PAR_MIN_ELEMS: usize = 1 << 14;

/// Target amount of work (elements touched) of one parallel task.
pub(crate) const PAR_GRAIN: usize = 1 << 13;

/// Rows of `row_len` elements per parallel task of a row-wise kernel.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (PAR_GRAIN / row_len.max(1)).max(1)
}

/// Runs `f(start, chunk)` over `out` split into chunks of `chunk` elements
/// (the last may be shorter), where `start` is the offset of `chunk` in
/// `out`. In parallel when `parallel` and there is more than one chunk,
/// otherwise as a single call on the whole of `out`; `f` must therefore
/// accept any chunk whose length is a multiple of the unit the caller
/// rounded `chunk` to.
pub(crate) fn for_chunks<T, F>(out: &mut [T], chunk: usize, parallel: bool, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    let chunk = chunk.max(1);
    if parallel && out.len() > chunk {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i * chunk, c));
    } else {
        f(0, out);
    }
}

/// Partial sums of [`lane_dot`]: one per lane of a 16-wide vector.
const LANES: usize = 16;

/// `Σ_j a[j]·b[j]` (each product `a[j]·b[j]` rounded, then added) in a
/// fixed order the compiler vectorises: element `j` of the first
/// `n − n mod 16` goes to partial sum `j mod 16`, the partial sums are
/// added pairwise (lane `i` and `i + w`, `w` = 8, 4, 2, 1), then the rest
/// in order. The same bits on every CPU and thread count; not the serial
/// sum's.
#[inline]
pub(crate) fn lane_dot<T: num_traits::Float>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..LANES {
            acc[j] = acc[j] + x[j] * y[j];
        }
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] = acc[j] + acc[j + w];
        }
    }
    ra.iter().zip(rb).fold(acc[0], |s, (&x, &y)| s + x * y)
}

/// Row-major multi-index of flat position `flat` in `shape`.
pub(crate) fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        if shape[d] > 0 {
            idx[d] = flat % shape[d];
            flat /= shape[d];
        }
    }
    idx
}

/// Advances the multi-index `idx` of `shape` by one (row-major), keeping
/// `offset = Σ idx[d] * strides[d]` up to date. Wraps to zero after the end.
#[inline]
pub(crate) fn step_index(
    idx: &mut [usize],
    shape: &[usize],
    strides: &[usize],
    offset: &mut usize,
) {
    for d in (0..shape.len()).rev() {
        idx[d] += 1;
        *offset += strides[d];
        if idx[d] < shape[d] {
            return;
        }
        *offset -= strides[d] * shape[d];
        idx[d] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_dot_sums_in_sixteen_lanes_then_pairwise_then_the_rest() {
        for n in [0, 1, 15, 16, 17, 128, 131, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            // The order spelled out.
            let full = n - n % 16;
            let mut lanes = [0.0f32; 16];
            for j in 0..full {
                lanes[j % 16] += a[j] * b[j];
            }
            for w in [8, 4, 2, 1] {
                for j in 0..w {
                    lanes[j] += lanes[j + w];
                }
            }
            let mut want = lanes[0];
            for j in full..n {
                want += a[j] * b[j];
            }
            let got = lane_dot(&a, &b);
            assert_eq!(got.to_bits(), want.to_bits(), "n = {n}");
            let exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from((x * y).abs()))
                .sum();
            assert!(
                (f64::from(got) - exact).abs() <= 1e-6 * scale.max(1e-30),
                "n = {n}"
            );
        }
    }
}
