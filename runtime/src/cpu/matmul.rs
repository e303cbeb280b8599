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

/// Products of fewer multiply-adds than this run on one thread.
const SPLIT_MIN_FLOPS: usize = 1 << 18;
/// Fewest output rows one thread computes of a product split by rows.
const SPLIT_MIN_ROWS: usize = 16;

/// Tasks each of `batch` `m × k × n` products is split into (by output
/// rows), for `threads` threads: enough that every thread has work where
/// the batch alone gives too little, none for small products.
fn row_tasks(batch: usize, m: usize, k: usize, n: usize, threads: usize) -> usize {
    if batch >= threads || m * k * n < SPLIT_MIN_FLOPS {
        return 1;
    }
    threads
        .div_ceil(batch.max(1))
        .min(m / SPLIT_MIN_ROWS)
        .max(1)
}

/// `batch` independent products of `a [m,k]` and `b [k,n]`, stored back to
/// back. Batches run in parallel (rayon), and where there are fewer than
/// threads, each large product is also split by output rows, one
/// single-threaded GEMM per part.
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
    let tasks = row_tasks(batch, m, k, n, rayon::current_num_threads());
    let rows = m.div_ceil(tasks);
    // Rows `r0..` of batch entry `i`, into `c` (those rows of the output).
    let run = |i: usize, r0: usize, c: &mut [T]| {
        let a = &a[i * m * k..(i + 1) * m * k];
        let b = &b[i * k * n..(i + 1) * k * n];
        let rows = c.len() / n;
        debug_assert!(r0 + rows <= m && c.len() == rows * n);
        // SAFETY: `a` holds exactly m*k elements, which the strides address
        // (row-major, or its transpose); rows r0..r0 + rows start r0 rows
        // (r0 * a_strides.0 elements) in. `b` holds k*n; `c` is a distinct,
        // exclusively borrowed buffer of rows*n.
        unsafe {
            T::gemm(
                rows,
                k,
                n,
                a.as_ptr().offset(r0 as isize * a_strides.0),
                a_strides,
                b.as_ptr(),
                b_strides,
                c.as_mut_ptr(),
            )
        }
    };
    if batch * tasks > 1 {
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
            if tasks > 1 {
                c.par_chunks_mut(rows * n)
                    .enumerate()
                    .for_each(|(j, c)| run(i, j * rows, c));
            } else {
                run(i, 0, c);
            }
        });
    } else {
        run(0, 0, &mut out);
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

    /// Products split by rows (and batches that are) equal the naive
    /// product, with either operand transposed.
    #[test]
    fn products_split_by_rows_match_naive() {
        let (m, k, n) = (203, 64, 40);
        assert!(row_tasks(1, m, k, n, 4) > 1 && row_tasks(2, m, k, n, 4) > 1);
        assert_eq!(row_tasks(1, 8, 8, 8, 4), 1);
        assert_eq!(row_tasks(4, m, k, n, 4), 1);
        assert_eq!(row_tasks(1, 20, 4096, 4096, 4), 1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        for batch in [1, 2] {
            let a: Vec<f64> = (0..batch * m * k).map(|i| (i % 11) as f64 - 5.0).collect();
            let b: Vec<f64> = (0..batch * k * n).map(|i| (i % 7) as f64 * 0.25).collect();
            let want: Vec<f64> = (0..batch)
                .flat_map(|i| {
                    naive(
                        &a[i * m * k..(i + 1) * m * k],
                        &b[i * k * n..(i + 1) * k * n],
                        m,
                        k,
                        n,
                    )
                })
                .collect();
            let t = |x: &[f64], r: usize, c: usize| -> Vec<f64> {
                x.chunks(r * c).flat_map(|x| transpose(x, r, c)).collect()
            };
            let (at, bt) = (t(&a, m, k), t(&b, k, n));
            pool.install(|| {
                assert_eq!(matmul(&a, &b, batch, m, k, n), want);
                assert_eq!(matmul_t(&at, true, &b, false, batch, m, k, n), want);
                assert_eq!(matmul_t(&a, false, &bt, true, batch, m, k, n), want);
            });
        }
    }

    #[test]
    fn zero_k_gives_zeros() {
        assert_eq!(matmul::<f32>(&[], &[], 2, 2, 0, 3), vec![0.0; 12]);
        assert!(matmul::<f32>(&[], &[0.0; 6], 1, 0, 2, 3).is_empty());
    }
}
