//! Index-driven kernels: row gather and its adjoint scatter_add_rows,
//! take_along_axis and its adjoint scatter_add, and one_hot. Indices are
//! checked before any data moves; accumulation follows ascending position
//! order, so results are deterministic.

use super::{for_chunks, PAR_GRAIN, PAR_MIN_ELEMS};
use num_traits::Float;

/// An index outside `0..bound` (negative indices do not wrap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexError {
    pub index: i64,
    pub bound: usize,
}

/// The first index (in position order) outside `0..bound`.
pub(crate) fn check(idx: &[i32], bound: usize) -> Result<(), IndexError> {
    match idx.iter().find(|&&i| i < 0 || i as usize >= bound) {
        Some(&i) => Err(IndexError {
            index: i as i64,
            bound,
        }),
        None => Ok(()),
    }
}

/// `(outer, extent, inner)` of `shape` around `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// `gather(table [V, rest…], ids [S…]) → [S…, rest…]`: one row of
/// `row = Π rest` elements copied per id.
pub fn gather<T>(table: &[T], vocab: usize, ids: &[i32]) -> Result<Vec<T>, IndexError>
where
    T: Copy + Default + Send + Sync,
{
    check(ids, vocab)?;
    let row = table.len().checked_div(vocab).unwrap_or(0);
    let mut out = vec![T::default(); ids.len() * row];
    if out.is_empty() {
        return Ok(out);
    }
    let per_task = (PAR_GRAIN / row).max(1) * row;
    let parallel = out.len() >= PAR_MIN_ELEMS;
    for_chunks(&mut out, per_task, parallel, |start, chunk| {
        for (j, dst) in chunk.chunks_exact_mut(row).enumerate() {
            let id = ids[start / row + j] as usize;
            dst.copy_from_slice(&table[id * row..(id + 1) * row]);
        }
    });
    Ok(out)
}

/// `scatter_add_rows(ids [S…], upd [S…, rest…]) → [rows, rest…]`: output row
/// `r` is `0 + upd[p_1] + upd[p_2] + …` over the positions `p_1 < p_2 < …`
/// whose id is `r`. `row = Π rest` is the length of one row.
pub fn scatter_add_rows<T>(
    ids: &[i32],
    upd: &[T],
    rows: usize,
    row: usize,
) -> Result<Vec<T>, IndexError>
where
    T: Float + Send + Sync,
{
    assert_eq!(upd.len(), ids.len() * row, "updates length");
    check(ids, rows)?;
    let mut out = vec![T::zero(); rows * row];
    if out.is_empty() {
        return Ok(out);
    }
    // Positions bucketed by id (a stable counting sort keeps them ascending).
    let mut start_of = vec![0usize; rows + 1];
    for &id in ids {
        start_of[id as usize + 1] += 1;
    }
    for r in 0..rows {
        start_of[r + 1] += start_of[r];
    }
    let mut fill = start_of.clone();
    let mut positions = vec![0usize; ids.len()];
    for (p, &id) in ids.iter().enumerate() {
        positions[fill[id as usize]] = p;
        fill[id as usize] += 1;
    }
    let per_task = (PAR_GRAIN / row).max(1) * row;
    let parallel = upd.len() + out.len() >= PAR_MIN_ELEMS;
    for_chunks(&mut out, per_task, parallel, |start, chunk| {
        for (j, dst) in chunk.chunks_exact_mut(row).enumerate() {
            let r = start / row + j;
            for &p in &positions[start_of[r]..start_of[r + 1]] {
                for (d, &u) in dst.iter_mut().zip(&upd[p * row..(p + 1) * row]) {
                    *d = *d + u;
                }
            }
        }
    });
    Ok(out)
}

/// `take_along_axis(x, idx)` on `axis`: `out[…, j, …] = x[…, idx[…, j, …], …]`,
/// where `idx` has `x`'s extents off `axis`. The output has `idx`'s shape.
pub fn take_along_axis<T>(
    x: &[T],
    x_shape: &[usize],
    idx: &[i32],
    idx_shape: &[usize],
    axis: usize,
) -> Result<Vec<T>, IndexError>
where
    T: Copy + Default + Send + Sync,
{
    let (_, ext_x, inner) = split(x_shape, axis);
    let (_, ext_i, _) = split(idx_shape, axis);
    check(idx, ext_x)?;
    let mut out = vec![T::default(); idx.len()];
    let block = ext_i * inner;
    if out.is_empty() {
        return Ok(out);
    }
    let per_task = (PAR_GRAIN / block).max(1) * block;
    let parallel = out.len() >= PAR_MIN_ELEMS;
    for_chunks(&mut out, per_task, parallel, |start, chunk| {
        for (ob, dst) in chunk.chunks_exact_mut(block).enumerate() {
            let o = start / block + ob;
            let src = &x[o * ext_x * inner..(o + 1) * ext_x * inner];
            let ix = &idx[o * block..(o + 1) * block];
            for j in 0..ext_i {
                for i in 0..inner {
                    let p = j * inner + i;
                    dst[p] = src[ix[p] as usize * inner + i];
                }
            }
        }
    });
    Ok(out)
}

/// `scatter_add(base, idx, upd)` on `axis`: `base` with `upd[…, j, …]` added
/// at `[…, idx[…, j, …], …]`, in ascending position order.
pub fn scatter_add<T>(
    base: &[T],
    base_shape: &[usize],
    idx: &[i32],
    idx_shape: &[usize],
    upd: &[T],
    axis: usize,
) -> Result<Vec<T>, IndexError>
where
    T: Float + Send + Sync,
{
    let (_, ext_b, inner) = split(base_shape, axis);
    let (_, ext_i, _) = split(idx_shape, axis);
    check(idx, ext_b)?;
    let mut out = base.to_vec();
    let out_block = ext_b * inner;
    let in_block = ext_i * inner;
    if out.is_empty() || in_block == 0 {
        return Ok(out);
    }
    // Different outer indices never collide, so they can run in parallel;
    // within one outer index the order is ascending (j, i).
    let per_task = (PAR_GRAIN / in_block).max(1) * out_block;
    let parallel = upd.len() >= PAR_MIN_ELEMS;
    for_chunks(&mut out, per_task, parallel, |start, chunk| {
        for (ob, dst) in chunk.chunks_exact_mut(out_block).enumerate() {
            let o = start / out_block + ob;
            let ix = &idx[o * in_block..(o + 1) * in_block];
            let up = &upd[o * in_block..(o + 1) * in_block];
            for j in 0..ext_i {
                for i in 0..inner {
                    let p = j * inner + i;
                    let d = &mut dst[ix[p] as usize * inner + i];
                    *d = *d + up[p];
                }
            }
        }
    });
    Ok(out)
}

/// `one_hot(ids [S…]) → [S…, depth]`: 1 at `ids[p]`, 0 elsewhere. An id that
/// is negative or `≥ depth` gives an all-zero row (not an error), so padding
/// ids such as -1 simply drop out.
pub fn one_hot<T: Float + Send + Sync>(ids: &[i32], depth: usize) -> Vec<T> {
    let mut out = vec![T::zero(); ids.len() * depth];
    if out.is_empty() {
        return out;
    }
    let per_task = (PAR_GRAIN / depth).max(1) * depth;
    let parallel = out.len() >= PAR_MIN_ELEMS;
    for_chunks(&mut out, per_task, parallel, |start, chunk| {
        for (j, row) in chunk.chunks_exact_mut(depth).enumerate() {
            let id = ids[start / depth + j];
            if id >= 0 && (id as usize) < depth {
                row[id as usize] = T::one();
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_add_rows_large_matches_serial() {
        let n = 5000;
        let row = 16;
        let rows = 37;
        let ids: Vec<i32> = (0..n).map(|p| ((p * 31) % rows) as i32).collect();
        let upd: Vec<f32> = (0..n * row)
            .map(|i| ((i * 13) % 101) as f32 * 0.01)
            .collect();
        let got = scatter_add_rows(&ids, &upd, rows, row).unwrap();
        let mut want = vec![0.0f32; rows * row];
        for (p, &id) in ids.iter().enumerate() {
            for c in 0..row {
                want[id as usize * row + c] += upd[p * row + c];
            }
        }
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn negative_index_is_an_error() {
        assert_eq!(
            gather(&[1.0f32, 2.0], 2, &[0, -1]),
            Err(IndexError {
                index: -1,
                bound: 2
            })
        );
        assert!(take_along_axis(&[1, 2, 3], &[3], &[3], &[1], 0).is_err());
    }
}
