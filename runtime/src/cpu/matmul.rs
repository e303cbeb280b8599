//! Batched matrix product `[…, m, k] × […, k, n] → […, m, n]` on top of
//! `matrixmultiply`'s packed GEMM, reading and writing the row-major buffers
//! in place (no transposes or copies).

use num_traits::Float;
use rayon::prelude::*;

/// Float types with a GEMM: `C = A B` for row-major `A [m,k]`, `B [k,n]`,
/// `C [m,n]` (β = 0, so `C` is only written).
pub trait Gemm: Float + Send + Sync {
    /// # Safety
    /// `a`, `b`, `c` must point to at least `m*k`, `k*n` and `m*n` valid
    /// elements, and `c` must not alias `a` or `b`.
    unsafe fn gemm_rowmajor(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        b: *const Self,
        c: *mut Self,
    );
}

impl Gemm for f32 {
    unsafe fn gemm_rowmajor(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
    ) {
        // SAFETY: forwarded from the caller; strides describe dense row-major
        // matrices of the stated sizes.
        unsafe {
            matrixmultiply::sgemm(
                m, k, n, 1.0, a, k as isize, 1, b, n as isize, 1, 0.0, c, n as isize, 1,
            )
        }
    }
}

impl Gemm for f64 {
    unsafe fn gemm_rowmajor(
        m: usize,
        k: usize,
        n: usize,
        a: *const f64,
        b: *const f64,
        c: *mut f64,
    ) {
        // SAFETY: as for f32.
        unsafe {
            matrixmultiply::dgemm(
                m, k, n, 1.0, a, k as isize, 1, b, n as isize, 1, 0.0, c, n as isize, 1,
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
    assert_eq!(a.len(), batch * m * k, "lhs length");
    assert_eq!(b.len(), batch * k * n, "rhs length");
    let mut out = vec![T::zero(); batch * m * n];
    if out.is_empty() || k == 0 {
        return out;
    }
    let run = |i: usize, c: &mut [T]| {
        let a = &a[i * m * k..(i + 1) * m * k];
        let b = &b[i * k * n..(i + 1) * k * n];
        debug_assert_eq!(c.len(), m * n);
        // SAFETY: the three slices have exactly m*k, k*n and m*n elements
        // and `c` is a distinct, exclusively borrowed buffer.
        unsafe { T::gemm_rowmajor(m, k, n, a.as_ptr(), b.as_ptr(), c.as_mut_ptr()) }
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

    #[test]
    fn zero_k_gives_zeros() {
        assert_eq!(matmul::<f32>(&[], &[], 2, 2, 0, 3), vec![0.0; 12]);
        assert!(matmul::<f32>(&[], &[0.0; 6], 1, 0, 2, 3).is_empty());
    }
}
