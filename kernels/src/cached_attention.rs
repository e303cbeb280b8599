//! The decode step's attention (`Op::CachedAttention`) as one hand-written
//! kernel: one query row per `[batch, head]` attends over the cache rows
//! `0..=pos` of its key/value head, `pos` read on the device, so a step
//! reads only the positions written so far and needs no mask, no
//! expanded copy of the cache for grouped-query heads and no
//! `[B, H, 1, L]` scores in memory.
//!
//! One cube of `CACHED_BLOCK` units per query row. The cache rows go by
//! chunks of `CACHED_CHUNK`: units score rows `tid, tid + block, …` of the
//! chunk into shared memory, the cube folds the chunk's maximum and its
//! sum of `exp(s − m)` (an online softmax across chunks), and unit `d <
//! hd` adds the chunk's `Σ_j e_j v[j, d]` to its output column, rescaled
//! with the running maximum. `hd ≤ CACHED_BLOCK`.

use crate::sample::{cube_max, cube_sum};
use cubecl::prelude::*;

/// Units per cube (and the largest head dimension).
pub const CACHED_BLOCK: usize = 128;
/// Cache rows per chunk (shared memory of the scores).
pub const CACHED_CHUNK: usize = 512;

/// A finite stand-in for −∞ (WGSL has no infinity literal): below every
/// score.
#[cube]
fn lowest() -> f32 {
    f32::new(-3.0e38)
}

/// `out[row] = softmax(q[row] kᵀ · scale) v` over cache rows `0..=pos[0]`
/// (clamped to `len − 1`; NaN for a negative position) of key/value head
/// `(row / heads) · kv_heads + (row % heads) / (heads / kv_heads)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn cached_attention(
    q: &Array<f32>,
    k: &Array<f32>,
    v: &Array<f32>,
    pos: &Array<f32>,
    out: &mut Array<f32>,
    rows: u32,
    heads: u32,
    kv_heads: u32,
    len: u32,
    hd: u32,
    scale: f32,
    #[comptime] block: usize,
    #[comptime] chunk: usize,
) {
    let row = CUBE_POS;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if row >= rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let (len, hd) = (len as usize, hd as usize);
    let heads = heads as usize;
    let group = heads / kv_heads as usize;
    let kv_head = (row / heads) * kv_heads as usize + (row % heads) / group;
    let k_base = kv_head * len * hd;
    let q_base = row * hd;
    let p = pos[0usize];
    let last = min(max(p, f32::new(0.0)), f32::cast_from(len as u32 - 1));
    let n = select(p < f32::new(0.0), 0usize, u32::cast_from(last) as usize + 1);
    let mut fold = SharedMemory::<f32>::new(block);
    let mut e = SharedMemory::<f32>::new(chunk);
    let mut m = lowest();
    let mut total = f32::new(0.0);
    let mut acc = f32::new(0.0);
    let mut c0 = 0usize;
    while c0 < n {
        let rows_here = min(chunk, n - c0);
        let mut local = lowest();
        let mut j = tid;
        while j < rows_here {
            let kb = k_base + (c0 + j) * hd;
            let mut dot = f32::new(0.0);
            let mut d = 0usize;
            while d < hd {
                dot += q[q_base + d] * k[kb + d];
                d += 1;
            }
            let s = dot * scale;
            e[j] = s;
            local = max(local, s);
            j += block;
        }
        let m_new = max(m, cube_max(local, &mut fold, tid));
        let mut part = f32::new(0.0);
        let mut j = tid;
        while j < rows_here {
            let x = (e[j] - m_new).exp();
            e[j] = x;
            part += x;
            j += block;
        }
        // (The fold's barriers also publish `e` to every unit.)
        let chunk_sum = cube_sum(part, &mut fold, tid);
        let rescale = (m - m_new).exp();
        total = total * rescale + chunk_sum;
        if tid < hd {
            let mut a = acc * rescale;
            let mut j = 0usize;
            while j < rows_here {
                a += e[j] * v[k_base + (c0 + j) * hd + tid];
                j += 1;
            }
            acc = a;
        }
        sync_cube();
        m = m_new;
        c0 += chunk;
    }
    if tid < hd {
        out[q_base + tid] = acc / total;
    }
}
