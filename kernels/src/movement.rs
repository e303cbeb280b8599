//! Data movement and indexing kernels: strided copies (slice, permute, pad,
//! concat, reshape), `take_along_axis` and its scatter, row gather (the
//! embedding) and its scatter, one-hot and iota. Indices are stored as
//! whole f32 numbers, like every device tensor; an index outside its range
//! reads NaN (the CPU executor reports an error there).
//!
//! Scatters are written as gathers (each output element sums the updates
//! aimed at it), so they are deterministic and need no float atomics, which
//! WGSL lacks.

use crate::program::expand_strided_index;
use coopc_ir::{strides, Graph, NodeId, Op};
use cubecl::prelude::*;

/// Everything a strided copy is specialised on: iteration shape, and the
/// source and destination strides and offsets (in elements).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CopySpec {
    pub shape: Vec<u32>,
    pub src_strides: Vec<u32>,
    pub src_offset: u32,
    pub dst_strides: Vec<u32>,
    pub dst_offset: u32,
}

impl CopySpec {
    /// The strided copies that compute a permute, slice, pad (its interior;
    /// the padding is a fill) or concat node (one copy per operand, in
    /// operand order); `None` for any other op.
    pub fn for_node(g: &Graph, id: NodeId) -> Option<Vec<CopySpec>> {
        if !matches!(
            g.op(id),
            Op::Permute { .. } | Op::Slice { .. } | Op::Pad { .. } | Op::Concat { .. }
        ) {
            return None;
        }
        let u = |v: usize| v as u32;
        let list = |v: &[usize]| v.iter().map(|&x| u(x)).collect::<Vec<u32>>();
        let shape = &g.ty(id).shape;
        let dst = strides(shape);
        let ops = g.inputs(id);
        let src = &g.ty(ops[0]).shape;
        let st = strides(src);
        Some(match g.op(id) {
            Op::Permute { perm } => vec![CopySpec {
                shape: list(shape),
                src_strides: perm.iter().map(|&p| u(st[p])).collect(),
                src_offset: 0,
                dst_strides: list(&dst),
                dst_offset: 0,
            }],
            Op::Slice { start, .. } => vec![CopySpec {
                shape: list(shape),
                src_strides: list(&st),
                src_offset: u(start.iter().zip(&st).map(|(a, s)| a * s).sum()),
                dst_strides: list(&dst),
                dst_offset: 0,
            }],
            Op::Pad { lo, .. } => vec![CopySpec {
                shape: list(src),
                src_strides: list(&st),
                src_offset: 0,
                dst_strides: list(&dst),
                dst_offset: u(lo.iter().zip(&dst).map(|(a, s)| a * s).sum()),
            }],
            Op::Concat { axis } => {
                let mut at = 0usize;
                ops.iter()
                    .map(|x| {
                        let src = &g.ty(*x).shape;
                        let spec = CopySpec {
                            shape: list(src),
                            src_strides: list(&strides(src)),
                            src_offset: 0,
                            dst_strides: list(&dst),
                            dst_offset: u(at * dst[*axis]),
                        };
                        at += src[*axis];
                        spec
                    })
                    .collect()
            }
            _ => unreachable!("checked above"),
        })
    }
}

#[allow(unused_variables)]
fn copy_index(i: usize, shape: Vec<u32>, strides: Vec<u32>, offset: u32) -> usize {
    unimplemented!("device-only: expanded into the kernel")
}

mod copy_index {
    use super::*;

    pub fn expand(
        scope: &mut Scope,
        i: NativeExpand<usize>,
        shape: Vec<u32>,
        strides: Vec<u32>,
        offset: u32,
    ) -> NativeExpand<usize> {
        let at = expand_strided_index(scope, i, &shape, &strides);
        offset_by::expand(scope, at, offset)
    }
}

#[cube]
fn offset_by(at: usize, #[comptime] offset: u32) -> usize {
    at + offset as usize
}

/// `dst[dst_offset + Σ i_a·dst_strides_a] = src[src_offset + Σ i_a·src_strides_a]`
/// over the iteration shape.
#[cube(launch)]
pub fn strided_copy(
    src: &Array<f32>,
    dst: &mut Array<f32>,
    numel: u32,
    #[comptime] spec: CopySpec,
) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        let s = copy_index(
            i,
            spec.shape.clone(),
            spec.src_strides.clone(),
            spec.src_offset,
        );
        let d = copy_index(
            i,
            spec.shape.clone(),
            spec.dst_strides.clone(),
            spec.dst_offset,
        );
        dst[d] = src[s];
    }
}

/// `table[base + index · row_len + col]` for a whole-number `index` in
/// `0..rows`, NaN otherwise.
#[cube]
fn checked(
    table: &Array<f32>,
    base: usize,
    index: f32,
    row_len: usize,
    rows: usize,
    col: usize,
) -> f32 {
    let inside = index >= f32::new(0.0) && index < f32::cast_from(rows);
    let r = select(inside, u32::cast_from(index) as usize, 0usize);
    let v = table[base + r * row_len + col];
    // NaN from a run-time zero: a folded 0/0 has no WGSL literal.
    let z = index - index;
    select(inside, v, z / z)
}

/// `out[o, j, n] = x[o, idx[o, j, n], n]` with x `[outer, lx, inner]`,
/// idx and out `[outer, lidx, inner]`.
#[cube(launch)]
pub fn take_along(
    x: &Array<f32>,
    idx: &Array<f32>,
    out: &mut Array<f32>,
    numel: u32,
    lx: u32,
    lidx: u32,
    inner: u32,
) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        let (lx, lidx, inner) = (lx as usize, lidx as usize, inner as usize);
        let n = i % inner;
        let o = i / (lidx * inner);
        // Block o of x holds lx rows of `inner` elements.
        out[i] = checked(x, o * lx * inner, idx[i], inner, lx, n);
    }
}

/// `out = base` plus `upd[o, j, n]` added at `[o, idx[o, j, n], n]`:
/// each output element `[o, kx, n]` sums the updates aimed at it.
#[cube(launch)]
pub fn scatter_add_along(
    base: &Array<f32>,
    idx: &Array<f32>,
    upd: &Array<f32>,
    out: &mut Array<f32>,
    numel: u32,
    lx: u32,
    lidx: u32,
    inner: u32,
) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        let (lx, lidx, inner) = (lx as usize, lidx as usize, inner as usize);
        let n = i % inner;
        let kx = (i / inner) % lx;
        let o = i / (lx * inner);
        let target = f32::cast_from(kx);
        let mut acc = base[i];
        let mut j = lidx * 0;
        while j < lidx {
            let at = (o * lidx + j) * inner + n;
            acc += select(idx[at] == target, upd[at], f32::new(0.0));
            j += 1;
        }
        out[i] = acc;
    }
}

/// `out[s, c] = table[ids[s], c]` (rows of `row_len`).
#[cube(launch)]
pub fn gather_rows(
    table: &Array<f32>,
    ids: &Array<f32>,
    out: &mut Array<f32>,
    numel: u32,
    rows: u32,
    row_len: u32,
) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        let row_len = row_len as usize;
        let s = i / row_len;
        out[i] = checked(table, 0usize, ids[s], row_len, rows as usize, i % row_len);
    }
}

/// Writes `upd` (`numel` elements, `[outer, 1, inner]`) into `out`
/// (`[outer, len, inner]`) at `index[0]` of the middle axis, leaving the
/// rest of `out` as it is; an index outside `0..len` writes nothing. With
/// `out` a copy of the base, or the base itself when its caller donated
/// it, this is `Op::UpdateSlice`.
#[cube(launch)]
pub fn write_slice(
    upd: &Array<f32>,
    index: &Array<f32>,
    out: &mut Array<f32>,
    numel: u32,
    len: u32,
    inner: u32,
) {
    let i = ABSOLUTE_POS;
    let at = index[0usize];
    if i < numel as usize && at >= f32::new(0.0) && at < f32::cast_from(len) {
        let inner = inner as usize;
        let o = i / inner;
        let pos = u32::cast_from(at) as usize;
        out[(o * len as usize + pos) * inner + i % inner] = upd[i];
    }
}

/// `out[r, c] = Σ_{s: ids[s] = r} upd[s, c]`, summed in order of s.
/// Launch with one cube per output row and `CubeDim(block)`: the cube
/// scans the ids `block` at a time, flagging the matches in shared
/// memory, and adds the flagged update rows to its row, each unit over
/// the columns `tid, tid + block, …`. An update row is read only by the
/// row it lands in, so the work is `O(rows · ids + ids · row_len)`.
#[cube(launch)]
pub fn scatter_add_rows(
    ids: &Array<f32>,
    upd: &Array<f32>,
    out: &mut Array<f32>,
    n_rows: u32,
    n_ids: u32,
    row_len: u32,
    #[comptime] block: usize,
) {
    let r = CUBE_POS;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if r >= n_rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let (n_ids, row_len) = (n_ids as usize, row_len as usize);
    let target = f32::cast_from(r as u32);
    let zero = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let mut hit = SharedMemory::<u32>::new(block);
    let mut c = tid;
    while c < row_len {
        out[r * row_len + c] = zero;
        c += block;
    }
    let mut s0 = tid * 0usize;
    while s0 < n_ids {
        let s = s0 + tid;
        let id = ids[select(s < n_ids, s, 0usize)];
        hit[tid] = select(s < n_ids && id == target, 1u32, 0u32);
        sync_cube();
        let mut c2 = tid;
        while c2 < row_len {
            let mut acc = zero;
            let mut q = tid * 0usize;
            while q < block {
                if hit[q] == 1u32 {
                    acc += upd[(s0 + q) * row_len + c2];
                }
                q += 1usize;
            }
            out[r * row_len + c2] += acc;
            c2 += block;
        }
        sync_cube();
        s0 += block;
    }
}

/// `out[s, v] = (ids[s] == v)`.
#[cube(launch)]
pub fn one_hot(ids: &Array<f32>, out: &mut Array<f32>, numel: u32, depth: u32) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        let depth = depth as usize;
        let v = f32::cast_from(i % depth);
        out[i] = select(ids[i / depth] == v, f32::new(1.0), f32::new(0.0));
    }
}

/// `out[…, j, …] = j` on an axis of `extent` with `inner` elements after it.
#[cube(launch)]
pub fn iota(out: &mut Array<f32>, numel: u32, extent: u32, inner: u32) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        out[i] = f32::cast_from((i / inner as usize) % extent as usize);
    }
}
