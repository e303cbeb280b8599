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

/// The widest vector unit of this CPU that kernels compiled for more than
/// one may use (`fused_cpu`'s programs).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SimdLevel {
    /// AVX-512 F/VL/DQ/BW with FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    Baseline,
}

/// This CPU's [`SimdLevel`], detected once.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_level() -> SimdLevel {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        use std::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma");
        let avx512 =
            avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512dq") && has!("avx512bw");
        if avx512 {
            SimdLevel::Avx512
        } else if avx2 {
            SimdLevel::Avx2
        } else {
            SimdLevel::Baseline
        }
    })
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
