//! Data-movement kernels for any element type: broadcast, permute and slice
//! (all one strided copy), concat and pad.

use super::{for_chunks, step_index, unravel, PAR_GRAIN, PAR_MIN_ELEMS};
use coopc_ir::{numel, strides};
use std::mem::MaybeUninit;

/// Side of the square tiles of the transposing copy.
const TILE: usize = 32;

/// Drops extent-1 axes and merges neighbouring axes that are contiguous with
/// each other in the source (`stride[i] == stride[i+1] * shape[i+1]`).
fn coalesce(shape: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut sh: Vec<usize> = Vec::with_capacity(shape.len());
    let mut st: Vec<usize> = Vec::with_capacity(shape.len());
    for (&d, &s) in shape.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match (sh.last_mut(), st.last_mut()) {
            (Some(pd), Some(ps)) if *ps == s * d => {
                *pd *= d;
                *ps = s;
            }
            _ => {
                sh.push(d);
                st.push(s);
            }
        }
    }
    (sh, st)
}

/// `out[i_0, …, i_{r-1}] = src[offset + Σ i_d * strides[d]]` for every
/// row-major index of `shape`: the one copy behind broadcast (stride 0),
/// permute (permuted strides) and slice (offset, source strides).
///
/// Rows along the last axis are copied with `copy_from_slice` when they are
/// contiguous in the source; when the source is contiguous along the
/// second-to-last axis instead (a transpose) the copy goes tile by tile.
pub fn strided_copy<T>(src: &[T], offset: usize, shape: &[usize], strides: &[usize]) -> Vec<T>
where
    T: Copy + Send + Sync,
{
    assert_eq!(shape.len(), strides.len());
    let n = numel(shape);
    // Every element is written exactly once below: allocated, not zeroed.
    let mut out: Vec<T> = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let (shape, strides) = coalesce(shape, strides);
    let nd = shape.len();
    let dst = &mut out.spare_capacity_mut()[..n];
    if nd == 0 {
        dst[0].write(src[offset]);
    } else {
        copy_into(src, offset, &shape, &strides, dst);
    }
    // SAFETY: `copy_into` wrote all n elements (each path covers every
    // row-major index of `shape`, whose element count is n).
    unsafe { out.set_len(n) };
    out
}

/// The body of [`strided_copy`] for a coalesced shape of rank ≥ 1, into
/// `dst` (`numel(shape)` elements, each written once).
fn copy_into<T>(
    src: &[T],
    offset: usize,
    shape: &[usize],
    strides: &[usize],
    dst: &mut [MaybeUninit<T>],
) where
    T: Copy + Send + Sync,
{
    let n = dst.len();
    let nd = shape.len();
    let len = shape[nd - 1];
    let step = strides[nd - 1];
    let parallel = n >= PAR_MIN_ELEMS;

    if nd >= 2 && step != 1 && strides[nd - 2] == 1 && len >= TILE && shape[nd - 2] >= TILE {
        // out[b, a, c] = src[base(b) + a + c * step]: a batch of transposes.
        let rows = shape[nd - 2];
        let batch_shape = &shape[..nd - 2];
        let batch_strides = &strides[..nd - 2];
        let rows_per_task = (PAR_GRAIN / len).max(1).div_ceil(TILE) * TILE;
        for_chunks(dst, rows_per_task * len, parallel, |start, chunk| {
            let first = start / len;
            let count = chunk.len() / len;
            let mut r = first;
            while r < first + count {
                let (b, a0) = (r / rows, r % rows);
                let a1 = rows.min(a0 + TILE).min(a0 + (first + count - r));
                let base = offset
                    + unravel(b, batch_shape)
                        .iter()
                        .zip(batch_strides)
                        .map(|(i, s)| i * s)
                        .sum::<usize>();
                let dst = &mut chunk[(r - first) * len..(r - first + a1 - a0) * len];
                for c0 in (0..len).step_by(TILE) {
                    let c1 = len.min(c0 + TILE);
                    for a in a0..a1 {
                        let row = &mut dst[(a - a0) * len..(a - a0 + 1) * len];
                        for (c, o) in row[c0..c1].iter_mut().enumerate() {
                            o.write(src[base + a + (c0 + c) * step]);
                        }
                    }
                }
                r += a1 - a0;
            }
        });
        return;
    }

    // Row by row along the last axis.
    let outer_shape = &shape[..nd - 1];
    let outer_strides = &strides[..nd - 1];
    let rows_per_task = (PAR_GRAIN / len).max(1);
    for_chunks(dst, rows_per_task * len, parallel, |start, chunk| {
        let mut idx = unravel(start / len, outer_shape);
        let mut base = offset
            + idx
                .iter()
                .zip(outer_strides)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        for row in chunk.chunks_exact_mut(len) {
            match step {
                1 => {
                    let from = &src[base..base + len];
                    // SAFETY: `row` and `from` are `len` elements each and
                    // do not overlap (`row` is in the new buffer);
                    // `MaybeUninit<T>` has the layout of `T`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            from.as_ptr(),
                            row.as_mut_ptr() as *mut T,
                            len,
                        )
                    }
                }
                0 => {
                    let v = src[base];
                    for o in row.iter_mut() {
                        o.write(v);
                    }
                }
                _ => {
                    for (j, o) in row.iter_mut().enumerate() {
                        o.write(src[base + j * step]);
                    }
                }
            }
            step_index(&mut idx, outer_shape, outer_strides, &mut base);
        }
    });
}

/// NumPy broadcasting of `x` (shape `in_shape`, right-aligned) to `out_shape`.
pub fn broadcast<T>(x: &[T], in_shape: &[usize], out_shape: &[usize]) -> Vec<T>
where
    T: Copy + Default + Send + Sync,
{
    let in_strides = strides(in_shape);
    let off = out_shape.len() - in_shape.len();
    let st: Vec<usize> = (0..out_shape.len())
        .map(|i| {
            if i < off || in_shape[i - off] == 1 {
                0
            } else {
                in_strides[i - off]
            }
        })
        .collect();
    strided_copy(x, 0, out_shape, &st)
}

/// `out.shape[i] = in.shape[perm[i]]`, `out[j] = in[j permuted back]`.
pub fn permute<T>(x: &[T], in_shape: &[usize], perm: &[usize]) -> Vec<T>
where
    T: Copy + Default + Send + Sync,
{
    let in_strides = strides(in_shape);
    let shape: Vec<usize> = perm.iter().map(|&p| in_shape[p]).collect();
    let st: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    strided_copy(x, 0, &shape, &st)
}

/// `x[start[i]..end[i]]` on every axis.
pub fn slice<T>(x: &[T], in_shape: &[usize], start: &[usize], end: &[usize]) -> Vec<T>
where
    T: Copy + Default + Send + Sync,
{
    let in_strides = strides(in_shape);
    let offset = start.iter().zip(&in_strides).map(|(a, s)| a * s).sum();
    let shape: Vec<usize> = start.iter().zip(end).map(|(a, b)| b - a).collect();
    strided_copy(x, offset, &shape, &in_strides)
}

/// Concatenation along `axis` of operands given as `(data, shape)`; shapes
/// agree off `axis`.
pub fn concat<T>(xs: &[(&[T], &[usize])], axis: usize) -> Vec<T>
where
    T: Copy + Default + Send + Sync,
{
    let Some(&(_, first)) = xs.first() else {
        return Vec::new();
    };
    let outer: usize = first[..axis].iter().product();
    // Per outer index, each operand contributes one contiguous block.
    let blocks: Vec<usize> = xs.iter().map(|(_, s)| s[axis..].iter().product()).collect();
    let row: usize = blocks.iter().sum();
    let mut out = vec![T::default(); outer * row];
    if out.is_empty() {
        return out;
    }
    let per_task = (PAR_GRAIN / row).max(1) * row;
    let parallel = out.len() >= PAR_MIN_ELEMS;
    for_chunks(&mut out, per_task, parallel, |start, chunk| {
        for (j, dst) in chunk.chunks_exact_mut(row).enumerate() {
            let o = start / row + j;
            let mut at = 0;
            for ((data, _), &b) in xs.iter().zip(&blocks) {
                dst[at..at + b].copy_from_slice(&data[o * b..(o + 1) * b]);
                at += b;
            }
        }
    });
    out
}

/// Constant padding: `lo[i]` elements of `value` before and `hi[i]` after
/// axis i.
pub fn pad<T: Copy>(x: &[T], in_shape: &[usize], lo: &[usize], hi: &[usize], value: T) -> Vec<T> {
    let out_shape: Vec<usize> = (0..in_shape.len())
        .map(|i| lo[i] + in_shape[i] + hi[i])
        .collect();
    let mut out = vec![value; numel(&out_shape)];
    if x.is_empty() {
        return out;
    }
    let r = in_shape.len();
    if r == 0 {
        out[0] = x[0];
        return out;
    }
    let out_strides = strides(&out_shape);
    let len = in_shape[r - 1];
    let outer_shape = &in_shape[..r - 1];
    let outer_strides = &out_strides[..r - 1];
    let mut idx = vec![0; r - 1];
    let mut dst = lo
        .iter()
        .zip(&out_strides)
        .map(|(l, s)| l * s)
        .sum::<usize>();
    for row in x.chunks_exact(len) {
        out[dst..dst + len].copy_from_slice(row);
        step_index(&mut idx, outer_shape, outer_strides, &mut dst);
    }
    out
}

/// `base` (of `shape`) with `update` (extent 1 on `axis`) written at
/// position `index` along `axis`; an index outside the axis changes
/// nothing (`Op::UpdateSlice`).
pub fn update_slice<T: Copy>(
    base: &[T],
    shape: &[usize],
    update: &[T],
    axis: usize,
    index: i32,
) -> Vec<T> {
    let mut out = base.to_vec();
    let len = shape[axis];
    let Some(at) = usize::try_from(index).ok().filter(|&i| i < len) else {
        return out;
    };
    let inner: usize = shape[axis + 1..].iter().product();
    if inner == 0 {
        return out;
    }
    for (o, row) in update.chunks(inner).enumerate() {
        let start = (o * len + at) * inner;
        out[start..start + inner].copy_from_slice(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference permute: one multi-index at a time.
    fn naive_permute(x: &[i32], shape: &[usize], perm: &[usize]) -> Vec<i32> {
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let in_strides = strides(shape);
        (0..numel(&out_shape))
            .map(|f| {
                let idx = unravel(f, &out_shape);
                let off: usize = idx.iter().zip(perm).map(|(&i, &p)| i * in_strides[p]).sum();
                x[off]
            })
            .collect()
    }

    #[test]
    fn permute_matches_naive_on_all_paths() {
        // Small (serial), tiled transposes, and large (parallel) cases.
        let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
            (vec![2, 3, 4], vec![2, 0, 1]),
            (vec![2, 3, 4], vec![1, 0, 2]),
            (vec![70, 45], vec![1, 0]),
            (vec![3, 40, 33], vec![0, 2, 1]),
            (vec![5, 64, 2, 40], vec![0, 3, 2, 1]),
            (vec![4, 300, 70], vec![0, 2, 1]),
            (vec![16, 8, 32, 24], vec![0, 2, 1, 3]),
            (vec![1, 37, 1, 50], vec![3, 2, 1, 0]),
        ];
        for (shape, perm) in cases {
            let x: Vec<i32> = (0..numel(&shape) as i32).collect();
            assert_eq!(
                permute(&x, &shape, &perm),
                naive_permute(&x, &shape, &perm),
                "shape {shape:?} perm {perm:?}"
            );
        }
    }

    #[test]
    fn broadcast_and_slice_large() {
        let x: Vec<i32> = (0..300).collect();
        let b = broadcast(&x, &[300], &[200, 300]);
        assert_eq!(b.len(), 60_000);
        assert!(b.chunks(300).all(|r| r == &x[..]));
        let c = broadcast(&x, &[300, 1], &[300, 150]);
        assert!(c
            .chunks(150)
            .enumerate()
            .all(|(i, r)| r.iter().all(|&v| v == i as i32)));
        let s = slice(&b, &[200, 300], &[10, 5], &[190, 295]);
        assert_eq!(s.len(), 180 * 290);
        assert!(s.chunks(290).all(|r| r == &x[5..295]));
    }

    #[test]
    fn concat_large_matches_naive() {
        let a: Vec<i32> = (0..300 * 70).collect();
        let b: Vec<i32> = (0..300 * 50).map(|v| -v).collect();
        let c = concat(&[(&a[..], &[300, 70][..]), (&b[..], &[300, 50][..])], 1);
        assert_eq!(c.len(), 300 * 120);
        for (r, row) in c.chunks(120).enumerate() {
            assert_eq!(&row[..70], &a[r * 70..(r + 1) * 70]);
            assert_eq!(&row[70..], &b[r * 50..(r + 1) * 50]);
        }
        let d = concat(&[(&a[..], &[300, 70][..]), (&a[..], &[300, 70][..])], 0);
        assert_eq!(&d[..a.len()], &a[..]);
        assert_eq!(&d[a.len()..], &a[..]);
    }

    #[test]
    fn coalesce_merges_contiguous_axes() {
        assert_eq!(coalesce(&[2, 3, 1, 4], &[12, 4, 4, 1]), (vec![24], vec![1]));
        assert_eq!(
            coalesce(&[2, 3, 4], &[4, 8, 1]),
            (vec![2, 3, 4], vec![4, 8, 1])
        );
    }
}
