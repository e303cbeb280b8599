//! Batched matrix product `[…, m, k] × […, k, n] → […, m, n]` on top of
//! `matrixmultiply`'s packed GEMM, reading and writing the row-major buffers
//! in place (no copies). Either operand may be stored transposed (the
//! buffer of a permute of its last two axes), which the GEMM reads through
//! its strides instead of a materialised transpose.

use num_traits::Float;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Float types with a GEMM: `C = A B` for `A [m,k]`, `B [k,n]` given by
/// row and column strides, row-major `C [m,n]` (β = 0, so `C` is only
/// written).
pub trait Gemm: Float + Send + Sync + super::elementwise::ExpSlice {
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
    let len = batch * m * n;
    if len == 0 || k == 0 {
        return vec![T::zero(); len];
    }
    // The GEMM writes every element with β = 0 without reading it, so the
    // output is not zeroed first (a pass over memory per product).
    let mut out: Vec<T> = Vec::with_capacity(len);
    let c_all = &mut out.spare_capacity_mut()[..len];
    let (m_, k_, n_) = (m as isize, k as isize, n as isize);
    let a_strides = if a_t { (1, m_) } else { (k_, 1) };
    let b_strides = if b_t { (1, k_) } else { (n_, 1) };
    let tasks = row_tasks(batch, m, k, n, rayon::current_num_threads());
    let rows = m.div_ceil(tasks);
    // Rows `r0..` of batch entry `i`, into `c` (those rows of the output).
    let run = |i: usize, r0: usize, c: &mut [MaybeUninit<T>]| {
        let a = &a[i * m * k..(i + 1) * m * k];
        let b = &b[i * k * n..(i + 1) * k * n];
        let rows = c.len() / n;
        debug_assert!(r0 + rows <= m && c.len() == rows * n);
        if let Some(kernel) = thin_kernel::<T>(rows, k, n, b_t) {
            // SAFETY: as for the GEMM below; `c` holds rows*n elements.
            unsafe {
                kernel(
                    rows,
                    k,
                    n,
                    a.as_ptr().offset(r0 as isize * a_strides.0),
                    a_strides,
                    b,
                    b_t,
                    c.as_mut_ptr() as *mut T,
                )
            };
            return;
        }
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
                c.as_mut_ptr() as *mut T,
            )
        }
    };
    if batch * tasks > 1 {
        c_all.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
            if tasks > 1 {
                c.par_chunks_mut(rows * n)
                    .enumerate()
                    .for_each(|(j, c)| run(i, j * rows, c));
            } else {
                run(i, 0, c);
            }
        });
    } else {
        run(0, 0, c_all);
    }
    // SAFETY: the GEMMs above wrote all `len` elements (every row of every
    // batch entry), with β = 0, which matrixmultiply documents as not
    // reading C.
    unsafe { out.set_len(len) };
    out
}

/// Products with at most this many output rows or columns skip the
/// packing GEMM (LoRA's rank-r factors, the `Aᵀ` of their gradients).
const THIN: usize = 16;
/// Reduction length of one block of the GEMM's microkernel
/// (`matrixmultiply`'s `KC` for f32 and f64).
const KC: usize = 256;

/// A product kernel: `(rows, k, n, a, a_strides, b, b_t, c)`.
type ThinKernel<T> = unsafe fn(usize, usize, usize, *const T, (isize, isize), &[T], bool, *mut T);

/// The no-packing kernel for a `rows × k × n` product, where one applies,
/// on a CPU with FMA and AVX2, the one on which `matrixmultiply` runs its
/// FMA microkernel: [`thin_fma`] for thin shapes, [`wide_fma512`] for f32
/// products large enough on AVX-512. Each output is computed with that
/// microkernel's operations in its order — a fused multiply-add chain over
/// each block of [`KC`] reduction steps from zero, the blocks added with
/// `fma(1, block, c)` — so the kernels and the GEMM give the same bits; on
/// other CPUs the GEMM runs every product.
fn thin_kernel<T: Float>(rows: usize, k: usize, n: usize, b_t: bool) -> Option<ThinKernel<T>> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2")) {
            return None;
        }
        // Few columns; or few rows of a B stored row-major (a B read
        // transposed with many columns and few rows, the decode step's
        // weights, is better packed by the GEMM than transposed here).
        if n <= THIN || (rows <= THIN && !b_t) {
            return Some(thin_fma::<T>);
        }
        if wide_applies::<T>(rows, k) && std::is_x86_feature_detected!("avx512f") {
            return Some(wide_fma512::<T>);
        }
    }
    let _ = (rows, k, n, b_t);
    None
}

/// Whether [`wide_fma512`] takes an f32 product of `rows` output rows and
/// reduction length `k` (on AVX-512): shorter reductions or fewer rows
/// stay with the packing GEMM (a tile's few steps do not pay for writing
/// it; a transposed B is copied for too few rows).
fn wide_applies<T>(rows: usize, k: usize) -> bool {
    std::mem::size_of::<T>() == 4 && k >= 64 && rows >= 64
}

/// As [`thin_fma`], for any shape, on AVX-512: each block of the
/// reduction is swept column panel by column panel, the panel of B kept in
/// cache across all row tiles (a B stored transposed is copied a panel at
/// a time, row-major, into a scratch buffer).
///
/// # Safety
/// As [`thin_fma`], with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn wide_fma512<T: Float>(
    rows: usize,
    k: usize,
    n: usize,
    a: *const T,
    (rsa, csa): (isize, isize),
    b: &[T],
    b_t: bool,
    c: *mut T,
) {
    const W: usize = 32;
    const MC: usize = 256;
    // SAFETY: rows*n writable elements (the caller's contract); every one
    // is written by the first block before any is read.
    let c = unsafe { std::slice::from_raw_parts_mut(c, rows * n) };
    let at = A { a, rsa, csa };
    let mut scratch = if b_t {
        vec![T::zero(); KC * W]
    } else {
        Vec::new()
    };
    let mut p0 = 0;
    while p0 < k {
        let p1 = (p0 + KC).min(k);
        let first = p0 == 0;
        // Blocks of MC rows, whose part of A stays in cache across the
        // column panels.
        let mut ib = 0;
        while ib < rows {
            let ie = (ib + MC).min(rows);
            let mut j0 = 0;
            while j0 < n {
                let w = n - j0;
                let step = if w >= W {
                    W
                } else if w >= 8 {
                    8
                } else {
                    1
                };
                // This panel of B: rows p0..p1, columns j0..j0 + step, as a
                // row-major slice with row stride `bs` whose row p0 starts at
                // `boff`.
                let (bsl, bs, boff): (&[T], usize, usize) = if b_t {
                    for jj in 0..step {
                        let col = &b[(j0 + jj) * k + p0..(j0 + jj) * k + p1];
                        for (pp, &x) in col.iter().enumerate() {
                            scratch[pp * step + jj] = x;
                        }
                    }
                    (&scratch, step, 0)
                } else {
                    (b, n, p0 * n + j0)
                };
                let mut i = ib;
                while i < ie {
                    let r = match ie - i {
                        8.. => 8,
                        4..=7 => 4,
                        _ => 1,
                    };
                    match (r, step) {
                        (8, W) => tile::<T, 8, W>(p0, p1, first, bsl, bs, boff, n, i, j0, &at, c),
                        (8, 8) => tile::<T, 8, 8>(p0, p1, first, bsl, bs, boff, n, i, j0, &at, c),
                        (8, _) => tile::<T, 8, 1>(p0, p1, first, bsl, bs, boff, n, i, j0, &at, c),
                        (4, W) => tile::<T, 4, W>(p0, p1, first, bsl, bs, boff, n, i, j0, &at, c),
                        (4, 8) => tile::<T, 4, 8>(p0, p1, first, bsl, bs, boff, n, i, j0, &at, c),
                        (4, _) => tile::<T, 4, 1>(p0, p1, first, bsl, bs, boff, n, i, j0, &at, c),
                        (_, W) => tile::<T, 1, W>(p0, p1, first, bsl, bs, boff, n, i, j0, &at, c),
                        (_, 8) => tile::<T, 1, 8>(p0, p1, first, bsl, bs, boff, n, i, j0, &at, c),
                        _ => tile::<T, 1, 1>(p0, p1, first, bsl, bs, boff, n, i, j0, &at, c),
                    }
                    i += r;
                }
                j0 += step;
            }
            ib = ie;
        }
        p0 = p1;
    }
}

/// One block of the reduction, rows `p0..p1`, for the `R × W` tile of `C`
/// at (`i0`, `j0`) (row stride `n`), B's rows read from `b` (row stride
/// `bs`, row `p0` at `boff`): an FMA chain from zero per element, added to
/// `c` with `fma(1, block, c)` (written when `first`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<T: Float, const R: usize, const W: usize>(
    p0: usize,
    p1: usize,
    first: bool,
    b: &[T],
    bs: usize,
    boff: usize,
    n: usize,
    i0: usize,
    j0: usize,
    at: &A<T>,
    c: &mut [T],
) {
    let mut acc = [[T::zero(); W]; R];
    for p in p0..p1 {
        let o = boff + (p - p0) * bs;
        let brow = &b[o..o + W];
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row i0 + r < rows and p < k, within the matrix the
            // caller's contract on `a` covers.
            let av = unsafe { at.at(i0 + r, p) };
            for j in 0..W {
                acc[j] = av.mul_add(brow[j], acc[j]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = (i0 + r) * n + j0;
        for (o, &x) in c[row..row + W].iter_mut().zip(acc) {
            let prev = if first { T::zero() } else { *o };
            *o = T::one().mul_add(x, prev);
        }
    }
}

/// `C = A B` for `A` (`rows × k`, at `a` with strides `a_strides`) and `B`
/// (`k × n`, or its `n × k` transpose when `b_t`), into row-major `C`
/// (`rows × n`, written, not read).
///
/// # Safety
/// The CPU has FMA and AVX2; `a` addresses `rows × k` valid elements at
/// its strides; `c` points to `rows * n` writable elements not aliasing
/// `a` or `b`; `b` holds `k * n` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn thin_fma<T: Float>(
    rows: usize,
    k: usize,
    n: usize,
    a: *const T,
    (rsa, csa): (isize, isize),
    b: &[T],
    b_t: bool,
    c: *mut T,
) {
    // B row-major, so a row of outputs reads contiguous rows of B.
    let bt;
    let b: &[T] = if b_t && n > 1 {
        // At most THIN columns here: a [k, n] copy of the [n, k] buffer.
        let mut t = vec![T::zero(); k * n];
        for (j, col) in b.chunks_exact(k).enumerate() {
            for (p, &x) in col.iter().enumerate() {
                t[p * n + j] = x;
            }
        }
        bt = t;
        &bt
    } else {
        b
    };
    // SAFETY: rows*n writable elements (the caller's contract), zeroed
    // (0.0 in f32 and f64) before the slice is made.
    let c = unsafe {
        std::ptr::write_bytes(c, 0, rows * n);
        std::slice::from_raw_parts_mut(c, rows * n)
    };
    let at = A { a, rsa, csa };
    // Blocks of 4 rows × 8 columns (four independent FMA chains per
    // column group hide the FMA latency), then what is left.
    let mut i = 0;
    while i < rows {
        let r = if rows - i >= 4 { 4 } else { 1 };
        let mut j0 = 0;
        while j0 < n {
            let w = n - j0;
            if r == 4 && w >= 8 {
                thin_block::<T, 4, 8>(k, n, i, j0, &at, b, c);
                j0 += 8;
            } else if w >= 32 {
                thin_block::<T, 1, 32>(k, n, i, j0, &at, b, c);
                j0 += 32;
            } else if w >= 8 {
                for ii in i..i + r {
                    thin_block::<T, 1, 8>(k, n, ii, j0, &at, b, c);
                }
                j0 += 8;
            } else {
                for ii in i..i + r {
                    thin_block::<T, 1, 1>(k, n, ii, j0, &at, b, c);
                }
                j0 += 1;
            }
        }
        i += r;
    }
}

/// The elements of `A` by row and column, at their strides.
#[derive(Clone, Copy)]
struct A<T> {
    a: *const T,
    rsa: isize,
    csa: isize,
}

impl<T: Copy> A<T> {
    /// Element (i, p).
    ///
    /// # Safety
    /// It lies within the matrix the pointer and strides address.
    #[inline(always)]
    unsafe fn at(&self, i: usize, p: usize) -> T {
        // SAFETY: forwarded from the caller.
        unsafe { *self.a.offset(i as isize * self.rsa + p as isize * self.csa) }
    }
}

/// Rows `i0 .. i0 + R`, columns `j0 .. j0 + W` of `C` (B row-major,
/// `k × n`): [`tile`] on each block of [`KC`] steps in turn.
#[inline(always)]
fn thin_block<T: Float, const R: usize, const W: usize>(
    k: usize,
    n: usize,
    i0: usize,
    j0: usize,
    at: &A<T>,
    b: &[T],
    c: &mut [T],
) {
    let mut p0 = 0;
    while p0 < k {
        let p1 = (p0 + KC).min(k);
        tile::<T, R, W>(p0, p1, p0 == 0, b, n, p0 * n + j0, n, i0, j0, at, c);
        p0 = p1;
    }
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

    /// The GEMM called directly (`matrixmultiply`, packing).
    fn packed<T: Gemm>(
        a: &[T],
        a_t: bool,
        b: &[T],
        b_t: bool,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<T> {
        let mut c = vec![T::zero(); m * n];
        let (m_, k_, n_) = (m as isize, k as isize, n as isize);
        let sa = if a_t { (1, m_) } else { (k_, 1) };
        let sb = if b_t { (1, k_) } else { (n_, 1) };
        // SAFETY: a holds m*k, b k*n, c m*n elements at these strides.
        unsafe { T::gemm(m, k, n, a.as_ptr(), sa, b.as_ptr(), sb, c.as_mut_ptr()) };
        c
    }

    fn thin_equals_packed<T: Gemm + std::fmt::Debug>(cast: fn(f64) -> T, bits: fn(T) -> u64) {
        let shapes = [
            (256, 128, 8),
            (256, 384, 8),
            (8, 256, 128),
            (16, 300, 40),
            (37, 257, 3),
            (5, 1, 9),
            (1, 600, 1),
            (16, 256, 17),
        ];
        for (m, k, n) in shapes {
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<T> = (0..m * k)
                    .map(|i| cast(((i * 37 % 101) as f64 - 50.0) / 7.3))
                    .collect();
                let b: Vec<T> = (0..k * n)
                    .map(|i| cast(((i * 53 % 89) as f64 - 44.0) / 3.1))
                    .collect();
                let want = packed(&a, a_t, &b, b_t, m, k, n);
                let got = matmul_t(&a, a_t, &b, b_t, 1, m, k, n);
                let (w, g): (Vec<u64>, Vec<u64>) = (
                    want.iter().map(|&x| bits(x)).collect(),
                    got.iter().map(|&x| bits(x)).collect(),
                );
                assert_eq!(w, g, "{m}×{k}×{n}, a_t {a_t}, b_t {b_t}");
            }
        }
    }

    #[test]
    fn thin_products_equal_the_packed_gemm_bit_for_bit() {
        // Where the no-packing kernel does not apply, both sides are the GEMM.
        thin_equals_packed::<f32>(|x| x as f32, |x| x.to_bits() as u64);
        thin_equals_packed::<f64>(|x| x, f64::to_bits);
        assert!(thin_kernel::<f32>(17, 17, 17, false).is_none());
        assert!(thin_kernel::<f32>(8, 17, 17, true).is_none());
    }

    /// The AVX-512 kernel on whole tiles, row remainders of 4 and 1, column
    /// remainders of 8 and 1, one and several reduction blocks, every
    /// operand layout: the GEMM's bits.
    #[test]
    fn wide_products_equal_the_packed_gemm_bit_for_bit() {
        let shapes = [
            (64, 64, 32),
            (77, 300, 45),
            (640, 128, 384),
            (100, 513, 70),
            (69, 64, 33),
        ];
        #[cfg(target_arch = "x86_64")]
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: every one of these products is the GEMM's");
        }
        for (m, k, n) in shapes {
            assert!(wide_applies::<f32>(m, k) && !wide_applies::<f64>(m, k));
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.3)
                    .collect();
                let b: Vec<f32> = (0..k * n)
                    .map(|i| ((i * 53 % 89) as f32 - 44.0) / 3.1)
                    .collect();
                let want = packed(&a, a_t, &b, b_t, m, k, n);
                // One task (the kernel on all rows) and the executor's split.
                let got = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap()
                    .install(|| matmul_t(&a, a_t, &b, b_t, 1, m, k, n));
                let split = matmul_t(&a, a_t, &b, b_t, 1, m, k, n);
                for got in [got, split] {
                    let same = want
                        .iter()
                        .zip(&got)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{m}×{k}×{n}, a_t {a_t}, b_t {b_t}");
                }
            }
        }
        // Below the thresholds: the GEMM.
        assert!(!wide_applies::<f32>(63, 256) && !wide_applies::<f32>(256, 63));
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
