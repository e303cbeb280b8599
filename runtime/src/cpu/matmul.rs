//! Batched matrix product `[…, m, k] × […, k, n] → […, m, n]` on top of
//! `matrixmultiply`'s packed GEMM, reading and writing the row-major buffers
//! in place (no copies). Either operand may be stored transposed (the
//! buffer of a permute of its last two axes), which the GEMM reads through
//! its strides instead of a materialised transpose.

use num_traits::Float;
use rayon::prelude::*;

/// Float types with a GEMM: `C = A B` for `A [m,k]`, `B [k,n]` given by
/// row and column strides, row-major `C [m,n]` (β = 0, so `C` is only
/// written).
pub trait Gemm: Float + Send + Sync {
    /// # Safety
    /// `a` and `b` must point to matrices whose elements lie within valid
    /// memory at the given strides, `c` to `m*n` valid elements, and `c`
    /// must not alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        a_strides: (isize, isize),
        b: *const Self,
        b_strides: (isize, isize),
        c: *mut Self,
    );
}

impl Gemm for f32 {
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        (rsa, csa): (isize, isize),
        b: *const f32,
        (rsb, csb): (isize, isize),
        c: *mut f32,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            matrixmultiply::sgemm(
                m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, n as isize, 1,
            )
        }
    }
}

impl Gemm for f64 {
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f64,
        (rsa, csa): (isize, isize),
        b: *const f64,
        (rsb, csb): (isize, isize),
        c: *mut f64,
    ) {
        // SAFETY: as for f32.
        unsafe {
            matrixmultiply::dgemm(
                m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, n as isize, 1,
            )
        }
    }
}

/// `batch` independent products of `a [m,k]` and `b [k,n]`, stored back to
/// back. Batches run in parallel (rayon) when there is more than one; each
/// product may itself use `matrixmultiply`'s threads.
///
/// Panics when the slice lengths do not match the sizes.
pub fn matmul<T: Gemm>(a: &[T], b: &[T], batch: usize, m: usize, k: usize, n: usize) -> Vec<T> {
    matmul_t(a, false, b, false, batch, m, k, n)
}

/// As [`matmul`], with `a` stored as `[k,m]` per batch entry when `a_t`
/// and `b` as `[n,k]` when `b_t` (each the buffer of the operand's
/// last-two-axes transpose).
#[allow(clippy::too_many_arguments)]
pub fn matmul_t<T: Gemm>(
    a: &[T],
    a_t: bool,
    b: &[T],
    b_t: bool,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<T> {
    assert_eq!(a.len(), batch * m * k, "lhs length");
    assert_eq!(b.len(), batch * k * n, "rhs length");
    let mut out = vec![T::zero(); batch * m * n];
    if out.is_empty() || k == 0 {
        return out;
    }
    let (m_, k_, n_) = (m as isize, k as isize, n as isize);
    let a_strides = if a_t { (1, m_) } else { (k_, 1) };
    let b_strides = if b_t { (1, k_) } else { (n_, 1) };
    let run = |i: usize, c: &mut [T]| {
        let a = &a[i * m * k..(i + 1) * m * k];
        let b = &b[i * k * n..(i + 1) * k * n];
        debug_assert_eq!(c.len(), m * n);
        // SAFETY: `a` and `b` hold exactly m*k and k*n elements, which the
        // strides address (row-major, or its transpose); `c` holds m*n and
        // is a distinct, exclusively borrowed buffer.
        unsafe {
            T::gemm(
                m,
                k,
                n,
                a.as_ptr(),
                a_strides,
                b.as_ptr(),
                b_strides,
                c.as_mut_ptr(),
            )
        }
    };
    if batch > 1 {
        out.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, c)| run(i, c));
    } else {
        run(0, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn odd_sizes_match_naive() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 2), (17, 33, 9), (64, 1, 70)] {
            let a: Vec<f64> = (0..m * k).map(|i| (i % 7) as f64 - 3.0).collect();
            let b: Vec<f64> = (0..k * n).map(|i| (i % 5) as f64 * 0.5).collect();
            assert_eq!(matmul(&a, &b, 1, m, k, n), naive(&a, &b, m, k, n));
        }
    }

    fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        (0..cols * rows)
            .map(|i| x[(i % rows) * cols + i / rows])
            .collect()
    }

    #[test]
    fn transposed_operands_match_naive() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i % 7) as f64 - 3.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i % 5) as f64 * 0.5 - 1.0).collect();
        let want = naive(&a, &b, m, k, n);
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        assert_eq!(matmul_t(&at, true, &b, false, 1, m, k, n), want);
        assert_eq!(matmul_t(&a, false, &bt, true, 1, m, k, n), want);
        assert_eq!(matmul_t(&at, true, &bt, true, 1, m, k, n), want);
    }

    #[test]
    fn zero_k_gives_zeros() {
        assert_eq!(matmul::<f32>(&[], &[], 2, 2, 0, 3), vec![0.0; 12]);
        assert!(matmul::<f32>(&[], &[0.0; 6], 1, 0, 2, 3).is_empty());
    }
}
