//! Fused linear log-prob, forward: `logprob[t] = h[t]·W[y_t] − logsumexp_v
//! h[t]·W[v]` for hidden states `h [T, d]`, an LM head `W [V, d]` and
//! targets `y [T]`, without ever materialising the `[T, V]` logits; and its
//! backward, `dh` and `dW` of `Σ_t g[t] · logprob[t]`, recomputing the
//! logits from the forward's per-token log-sum-exp.
//!
//! With CubeCL's matmul (the device's default, [`crate::matmul::MatmulKernel::Cubecl`])
//! the logits are its products, a vocabulary chunk at a time
//! (`linear_logprob::device_chunk` rows, `T · chunk ≤ 2²⁴`, the same
//! scratch for any vocabulary), and small kernels work around them:
//! [`linear_logprob_fold`] folds each chunk into a running (max, Σexp)
//! per token ([`linear_logprob_merge`] turns it into the log-sum-exp and
//! log-probs), and in the backward
//! [`linear_logprob_scale`] turns a chunk's logits into the coefficients
//! below. With coopc's matmul the logits never leave registers:
//!
//! - forward, tokens the rows of h ([`linear_logprob_forward_blocked`]):
//!   the vocabulary is cut into spans (`linear_logprob::forward_splits`,
//!   about 256 cubes in all); a cube takes 64 tokens × one span, computes
//!   64 × 64 tiles of logits with the register-blocked product of `matmul`
//!   and folds them into an online (max, Σexp) per token and unit, merged
//!   over its units at the end; [`linear_logprob_merge`] combines the
//!   spans. Memory `O(T · spans)` beyond the operands.
//! - forward of a matched subgraph whose tokens skip rows of h
//!   ([`linear_logprob_forward`]): a cube per `TILE` (16) tokens sweeps the
//!   vocabulary in `TILE × TILE` tiles, one logit per unit.
//! - backward: a chunk of the vocabulary at a time
//!   (`linear_logprob::device_chunk` rows, `T · chunk ≤ 2²⁴` where it can),
//!   [`linear_logprob_coefficients`] computes the chunk's logits with the
//!   register-blocked product of `matmul` (64 × 64 per cube, 4 × 4 per
//!   unit) and turns them into `C = g (1[v = y] − p)` in its epilogue; then
//!   two matrix products take the gradients from the same `C`: `dh += C ·
//!   W[chunk]` and `dW[chunk] = Cᵀ · h` (the device's matmul: CubeCL's,
//!   reading `W[chunk]` and writing `dW[chunk]` through views of the
//!   buffers and adding to dh through a temporary, or coopc's kernels,
//!   which read and write at offsets and accumulate themselves). The
//!   logits are recomputed once for both gradients; the scratch is one
//!   chunk of `C`, the same for any vocabulary.
//!
//! The device executor runs the IR's `linear_logprob` op (and a matched
//! log-softmax-of-logits subgraph) with the forward kernel, and the
//! `linear_logprob_grad` ops of one log-prob with the forward (for the
//! log-sum-exp) and one pass of the backward. A target outside `0..V`
//! makes its row NaN (and, through `Cᵀ · h`, every row of dW).

use crate::device::{arg, cubes, Device, DeviceError};
use crate::matmul::{blocked_product, load_or_zero, MatmulShape, Product, BLOCK_MN, REG};
use crate::sample::{cube_max, cube_sum};
use coopc_ir::kernel::{device_chunk, forward_splits};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// Tile edge: cubes are `TILE × TILE` units.
pub const LOGPROB_TILE: usize = 16;

/// Units per cube of [`linear_logprob_fold`] (one cube per token).
pub const FOLD_BLOCK: usize = 256;

/// `Σ_k x[xr + k] · w[wr + k]` over `k < d` for this unit: the logit of
/// row `xr / d` of x (unit row `ty`) and row `wr / d` of w (unit column
/// `tx`), through `tile`-wide panels staged in `sx` and `sw`. Every unit of
/// the cube must call it (it synchronises); `x_ok` / `w_ok` say whether
/// the unit's rows exist.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_logit(
    x: &Array<f32>,
    x_row: usize,
    x_ok: bool,
    w: &Array<f32>,
    w_row: usize,
    w_ok: bool,
    d: usize,
    sx: &mut SharedMemory<f32>,
    sw: &mut SharedMemory<f32>,
    #[comptime] tile: usize,
) -> f32 {
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let mut acc = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    let mut k0 = (UNIT_POS_X * 0) as usize;
    while k0 < d {
        let kc = k0 + tx;
        // sx: row ty of x's panel; sw: row ty of w's panel (read as
        // column tx below).
        sx[ty * tile + tx] = load_or_zero(x, x_row + kc, x_ok && kc < d);
        sw[ty * tile + tx] = load_or_zero(w, w_row + kc, w_ok && kc < d);
        sync_cube();
        for q in 0..tile {
            acc += sx[ty * tile + q] * sw[tx * tile + q];
        }
        sync_cube();
        k0 += tile;
    }
    acc
}

/// Whether a target (stored as f32) is a token id in `0..vocab`, and that
/// id (0 when it is not).
#[cube]
fn target_id(y: f32, vocab: usize) -> (bool, usize) {
    let inside = y >= f32::new(0.0) && y < f32::cast_from(vocab as u32);
    (
        inside,
        u32::cast_from(select(inside, y, f32::new(0.0))) as usize,
    )
}

/// Launch with `CubeDim(tile, tile)` and `ceil(T / tile)` cubes. Unit
/// `(ty, tx)` scores token `tile · cube + ty` against vocabulary column
/// `tx` of each tile. Token `t` reads row `(t / seq_out) · seq_in + t %
/// seq_out` of `h` (sequences of `seq_in` hidden states of which the first
/// `seq_out` are scored; `seq_out = seq_in` for all of them).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_forward(
    h: &Array<f32>,
    w: &Array<f32>,
    targets: &Array<f32>,
    logprob: &mut Array<f32>,
    lse: &mut Array<f32>,
    n_tokens: u32,
    d: u32,
    vocab: u32,
    seq_out: u32,
    seq_in: u32,
    #[comptime] tile: usize,
) {
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let (n, d, vocab) = (n_tokens as usize, d as usize, vocab as usize);
    let tok = CUBE_POS_X as usize * tile + ty;
    let tok_ok = tok < n;
    let tc = select(tok_ok, tok, 0usize);
    let h_row = ((tc / seq_out as usize) * seq_in as usize + tc % seq_out as usize) * d;
    let (inside, target) = target_id(targets[tc], vocab);
    let mut sx = SharedMemory::<f32>::new(tile * tile);
    let mut sw = SharedMemory::<f32>::new(tile * tile);
    let mut sz = SharedMemory::<f32>::new(tile * tile);
    let mut target_logit = SharedMemory::<f32>::new(tile);
    // Run-time constants (WGSL has no literal for −∞).
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    let lowest = zero - f32::new(3.0e38);
    let mut m = lowest;
    let mut s = zero;
    let mut v0 = (UNIT_POS_X * 0) as usize;
    while v0 < vocab {
        let w_row = v0 + ty;
        let z = tile_logit(
            h,
            h_row,
            tok_ok,
            w,
            w_row * d,
            w_row < vocab,
            d,
            &mut sx,
            &mut sw,
            tile,
        );
        let v = v0 + tx;
        sz[ty * tile + tx] = select(v < vocab, z, lowest);
        if v == target {
            target_logit[ty] = z;
        }
        sync_cube();
        if tx == 0 {
            for q in 0..tile {
                let zq = sz[ty * tile + q];
                let mn = max(m, zq);
                s = s * (m - mn).exp() + (zq - mn).exp();
                m = mn;
            }
        }
        sync_cube();
        v0 += tile;
    }
    if tx == 0 && tok_ok {
        let l = m + s.ln();
        lse[tok] = l;
        logprob[tok] = select(inside, target_logit[ty] - l, zero / zero);
    }
}

/// Partial log-sum-exps of a span of the vocabulary for 64 tokens: the
/// logits by the register-blocked product (`matmul::blocked_product`), 64
/// vocabulary rows at a time, folded into an online (max, Σexp) per token
/// and unit, merged over the cube's units at the end into `part_m`,
/// `part_s` (`[splits, T]`, split = cube x). The unit that meets a
/// token's target writes its logit to `target_logit[t]`. Launch with
/// `CubeDim(16, 16)` and `CubeCount(splits, ceil(T / 64))`; `span` a
/// multiple of 64 (see `linear_logprob::forward_splits`); `h` rows are the
/// tokens.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_forward_blocked(
    h: &Array<f32>,
    w: &Array<f32>,
    targets: &Array<f32>,
    part_m: &mut Array<f32>,
    part_s: &mut Array<f32>,
    target_logit: &mut Array<f32>,
    n_tokens: u32,
    d: u32,
    vocab: u32,
    span: u32,
) {
    let (n, d, vocab) = (n_tokens as usize, d as usize, vocab as usize);
    let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let split = CUBE_POS_X as usize;
    let row0 = CUBE_POS_Y as usize * BLOCK_MN;
    let begin = split * span as usize;
    let end = select(begin + span as usize <= vocab, begin + span as usize, vocab);
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    let lowest = zero - f32::new(3.0e38);
    let mut m = Array::<f32>::new(REG);
    let mut s = Array::<f32>::new(REG);
    let mut tgt = Array::<u32>::new(REG);
    #[unroll]
    for i in 0..REG {
        m[i] = lowest;
        s[i] = zero;
        let t = row0 + ty + 16 * i;
        let (_, target) = target_id(targets[select(t < n, t, 0usize)], vocab);
        tgt[i] = target as u32;
    }
    let mut acc = Array::<f32>::new(REG * REG);
    let mut v0 = begin;
    while v0 < end {
        let cols = end - v0;
        blocked_product(
            h,
            0usize,
            w,
            v0 * d,
            n,
            d,
            cols,
            row0,
            0usize,
            &mut acc,
            false,
            true,
            REG,
        );
        #[unroll]
        for i in 0..REG {
            let t = row0 + ty + 16 * i;
            // This unit's columns of the tile: one rescale per tile.
            let mut mx = m[i];
            #[unroll]
            for j in 0..REG {
                if tx + 16 * j < cols {
                    mx = max(mx, acc[i * REG + j]);
                }
            }
            let mut sum = s[i] * (m[i] - mx).exp();
            #[unroll]
            for j in 0..REG {
                let c = tx + 16 * j;
                if c < cols {
                    let z = acc[i * REG + j];
                    sum += (z - mx).exp();
                    if t < n && v0 + c == tgt[i] as usize {
                        target_logit[t] = z;
                    }
                }
            }
            m[i] = mx;
            s[i] = sum;
        }
        v0 += BLOCK_MN;
    }
    // Merge the 16 units of each token row.
    let mut sm = SharedMemory::<f32>::new(BLOCK_MN * 16);
    let mut ss = SharedMemory::<f32>::new(BLOCK_MN * 16);
    #[unroll]
    for i in 0..REG {
        let r = ty + 16 * i;
        sm[r * 16 + tx] = m[i];
        ss[r * 16 + tx] = s[i];
    }
    sync_cube();
    let tid = ty * 16 + tx;
    if tid < BLOCK_MN {
        let t = row0 + tid;
        let mut mm = lowest;
        #[unroll]
        for q in 0..16 {
            mm = max(mm, sm[tid * 16 + q]);
        }
        let mut sum = zero;
        #[unroll]
        for q in 0..16 {
            sum += ss[tid * 16 + q] * (sm[tid * 16 + q] - mm).exp();
        }
        if t < n {
            part_m[split * n + t] = mm;
            part_s[split * n + t] = sum;
        }
    }
}

/// Folds one chunk's logits `z [T, vc]` (vocabulary rows `v0..v0 + vc`,
/// computed by a matrix product) into each token's running (max, Σexp),
/// `run_m[t]`, `run_s[t]` (set by the first chunk, `v0 = 0`), and writes
/// `target_logit[t]` where the token's target lies in the chunk. One cube
/// of `block` units per token; the chunks' launches run in order.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_fold(
    z: &Array<f32>,
    targets: &Array<f32>,
    run_m: &mut Array<f32>,
    run_s: &mut Array<f32>,
    target_logit: &mut Array<f32>,
    n_tokens: u32,
    vocab: u32,
    v0: u32,
    vc: u32,
    #[comptime] block: usize,
) {
    let t = CUBE_POS;
    let n = n_tokens as usize;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if t >= n {
        terminate!();
    }
    let (v0, vc) = (v0 as usize, vc as usize);
    let tid = UNIT_POS as usize;
    let row = t * vc;
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    let mut shared = SharedMemory::<f32>::new(block);
    let mut mx = zero - f32::new(3.0e38);
    let mut j = tid;
    while j < vc {
        mx = max(mx, z[row + j]);
        j += block;
    }
    let mm = cube_max(mx, &mut shared, tid);
    let mut sum = zero;
    let mut j2 = tid;
    while j2 < vc {
        sum += (z[row + j2] - mm).exp();
        j2 += block;
    }
    let total = cube_sum(sum, &mut shared, tid);
    if tid == 0 {
        if v0 == 0 {
            run_m[t] = mm;
            run_s[t] = total;
        } else {
            let (m0, s0) = (run_m[t], run_s[t]);
            let m1 = max(m0, mm);
            run_m[t] = m1;
            run_s[t] = s0 * (m0 - m1).exp() + total * (mm - m1).exp();
        }
        let (inside, target) = target_id(targets[t], vocab as usize);
        if inside && target >= v0 && target < v0 + vc {
            target_logit[t] = z[row + target - v0];
        }
    }
}

/// The gradients' coefficients of one chunk from its logits, in place:
/// `c[t, cc] ← g[t] (1[v0 + cc = y_t] − exp(c[t, cc] − lse[t]))` for `c
/// [T, vc]` (the epilogue of [`linear_logprob_coefficients`], for logits
/// computed by a matrix product). One unit per element. A target outside
/// `0..vocab` makes its row NaN.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_scale(
    c: &mut Array<f32>,
    targets: &Array<f32>,
    lse: &Array<f32>,
    grad: &Array<f32>,
    n_tokens: u32,
    vocab: u32,
    v0: u32,
    vc: u32,
) {
    let i = ABSOLUTE_POS;
    let vc = vc as usize;
    if i < n_tokens as usize * vc {
        let (t, cc) = (i / vc, i % vc);
        let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
        let (inside, target) = target_id(targets[t], vocab as usize);
        let g = select(inside, grad[t], zero / zero);
        let hit = select(v0 as usize + cc == target, f32::new(1.0), zero);
        c[i] = g * (hit - (c[i] - lse[t]).exp());
    }
}

/// `lse[t]` from the splits' partial (max, Σexp) and `logprob[t] =
/// target_logit[t] − lse[t]` (NaN for a target outside `0..vocab`); one
/// unit per token.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_merge(
    targets: &Array<f32>,
    part_m: &Array<f32>,
    part_s: &Array<f32>,
    target_logit: &Array<f32>,
    logprob: &mut Array<f32>,
    lse: &mut Array<f32>,
    n_tokens: u32,
    vocab: u32,
    splits: u32,
) {
    let t = ABSOLUTE_POS;
    let n = n_tokens as usize;
    if t < n {
        let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
        let mut mm = zero - f32::new(3.0e38);
        let mut k = t * 0usize;
        while k < splits as usize {
            mm = max(mm, part_m[k * n + t]);
            k += 1usize;
        }
        let mut sum = zero;
        let mut k2 = t * 0usize;
        while k2 < splits as usize {
            sum += part_s[k2 * n + t] * (part_m[k2 * n + t] - mm).exp();
            k2 += 1usize;
        }
        let l = mm + sum.ln();
        let (inside, _) = target_id(targets[t], vocab as usize);
        lse[t] = l;
        logprob[t] = select(inside, target_logit[t] - l, zero / zero);
    }
}

/// One chunk of the gradients' coefficients, `c[t, cc] = g[t] (1[v =
/// y_t] − exp(h[t]·W[v] − lse[t]))` for `v = v0 + cc < v0 + vc`, into `c
/// [T, vc]`: the logits of the chunk by the register-blocked product
/// (`matmul::blocked_product`), the coefficients in its epilogue. Launch
/// with `CubeDim(16, 16)` and `CubeCount(ceil(vc / 64), ceil(T / 64))`. A
/// target outside `0..vocab` makes its row NaN.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_coefficients(
    h: &Array<f32>,
    w: &Array<f32>,
    targets: &Array<f32>,
    lse: &Array<f32>,
    grad: &Array<f32>,
    c: &mut Array<f32>,
    n_tokens: u32,
    d: u32,
    vocab: u32,
    v0: u32,
    vc: u32,
) {
    let (n, d, vocab, v0, vc) = (
        n_tokens as usize,
        d as usize,
        vocab as usize,
        v0 as usize,
        vc as usize,
    );
    let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let row0 = CUBE_POS_Y as usize * BLOCK_MN;
    let col0 = CUBE_POS_X as usize * BLOCK_MN;
    let mut acc = Array::<f32>::new(REG * REG);
    blocked_product(
        h,
        0usize,
        w,
        v0 * d,
        n,
        d,
        vc,
        row0,
        col0,
        &mut acc,
        false,
        true,
        REG,
    );
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    #[unroll]
    for i in 0..REG {
        let t = row0 + ty + 16 * i;
        let tc = select(t < n, t, 0usize);
        let (inside, target) = target_id(targets[tc], vocab);
        let g = select(inside, grad[tc], zero / zero);
        let l = lse[tc];
        #[unroll]
        for j in 0..REG {
            let cc = col0 + tx + 16 * j;
            if t < n && cc < vc {
                let hit = select(v0 + cc == target, f32::new(1.0), zero);
                c[t * vc + cc] = g * (hit - (acc[i * REG + j] - l).exp());
            }
        }
    }
}

/// Folds one chunk's logits `z [T, vc]` (vocabulary rows `v0..`, a
/// matrix product's) into each token's running `(m, s, u)`: the maximum,
/// `s = Σ exp(z − m)` and `u = Σ exp(z − m)(z − m)` (set by the first
/// chunk, `v0 = 0`), and writes what they give so far, `lse[t] = m + ln s`
/// and `entropy[t] = ln s − u / s` (after the last chunk, the row's
/// log-sum-exp and entropy `−Σ p log p`). One cube of `block` units per
/// token; the chunks' launches run in order.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_entropy_fold(
    z: &Array<f32>,
    run_m: &mut Array<f32>,
    run_s: &mut Array<f32>,
    run_u: &mut Array<f32>,
    lse: &mut Array<f32>,
    entropy: &mut Array<f32>,
    n_tokens: u32,
    v0: u32,
    vc: u32,
    #[comptime] block: usize,
) {
    let t = CUBE_POS;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if t >= n_tokens as usize {
        terminate!();
    }
    let vc = vc as usize;
    let tid = UNIT_POS as usize;
    let row = t * vc;
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    let mut shared = SharedMemory::<f32>::new(block);
    let mut mx = zero - f32::new(3.0e38);
    let mut j = tid;
    while j < vc {
        mx = max(mx, z[row + j]);
        j += block;
    }
    let mm = cube_max(mx, &mut shared, tid);
    let mut sum = zero;
    let mut wsum = zero;
    let mut j2 = tid;
    while j2 < vc {
        let x = z[row + j2] - mm;
        let e = x.exp();
        sum += e;
        wsum += e * x;
        j2 += block;
    }
    let total = cube_sum(sum, &mut shared, tid);
    let wtotal = cube_sum(wsum, &mut shared, tid);
    if tid == 0 {
        let mut m = mm;
        let mut s = total;
        let mut u = wtotal;
        if v0 > 0 {
            let (m0, s0, u0) = (run_m[t], run_s[t], run_u[t]);
            m = max(m0, mm);
            let (a, b) = ((m0 - m).exp(), (mm - m).exp());
            s = s0 * a + total * b;
            u = a * (u0 + (m0 - m) * s0) + b * (wtotal + (mm - m) * total);
        }
        run_m[t] = m;
        run_s[t] = s;
        run_u[t] = u;
        lse[t] = m + s.ln();
        entropy[t] = s.ln() - u / s;
    }
}

/// The entropy gradient's coefficients of one chunk from its logits, in
/// place: `c[t, cc] ← −g[t] p (log p + H[t])` with `log p = c[t, cc] −
/// lse[t]` for `c [T, vc]`. One unit per element.
#[cube(launch)]
pub fn linear_entropy_scale(
    c: &mut Array<f32>,
    lse: &Array<f32>,
    entropy: &Array<f32>,
    grad: &Array<f32>,
    n_tokens: u32,
    vc: u32,
) {
    let i = ABSOLUTE_POS;
    let vc = vc as usize;
    if i < n_tokens as usize * vc {
        let t = i / vc;
        let lp = c[i] - lse[t];
        c[i] = f32::new(0.0) - grad[t] * lp.exp() * (lp + entropy[t]);
    }
}

/// One cube per `LOGPROB_TILE` rows.
fn tiles(rows: usize) -> CubeCount {
    CubeCount::Static((rows.div_ceil(LOGPROB_TILE)) as u32, 1, 1)
}

/// Every target a whole number in `0..vocab`.
fn check_targets(what: &str, targets: &[f32], vocab: usize) -> Result<(), DeviceError> {
    let token = |y: f32| y >= 0.0 && y < vocab as f32 && y.fract() == 0.0;
    match targets.iter().position(|&y| !token(y)) {
        Some(i) => Err(DeviceError::Device(format!(
            "{what}: target {i} is {}, not a token id in 0..{vocab}",
            targets[i]
        ))),
        None => Ok(()),
    }
}

/// The kernels of the gradients' products where coopc's kernels run them
/// (what `--emit kernels` writes), for `n` tokens, `d` features and
/// `vocab` rows in chunks of `chunk`: `dh`'s, `dW`'s for a whole chunk, and
/// `dW`'s for the last, shorter chunk where that runs another kernel.
pub(crate) fn blocked_products(
    n: usize,
    d: usize,
    vocab: usize,
    chunk: usize,
) -> (Product, Product, Option<Product>) {
    let chunk = chunk.clamp(1, vocab.max(1));
    let dw = Product::for_shape(chunk, d);
    let last = vocab % chunk;
    let rest = (last > 0)
        .then(|| Product::for_shape(last, d))
        .filter(|&p| p != dw);
    (Product::for_shape(n, d), dw, rest)
}

/// Sizes of one linear log-prob: `n` scored rows, `d` features, `vocab`
/// rows of `w`; scored row `t` reads row `(t / seq_out) · seq_in + t %
/// seq_out` of `h` (`seq_out = seq_in = n`: row t).
#[derive(Clone, Copy, Debug)]
pub struct LogprobShape {
    pub n: usize,
    pub d: usize,
    pub vocab: usize,
    pub seq_out: usize,
    pub seq_in: usize,
}

impl LogprobShape {
    /// `n` tokens, the rows of `h [n, d]`, scored against `vocab` rows.
    pub fn tokens(n: usize, d: usize, vocab: usize) -> LogprobShape {
        LogprobShape {
            n,
            d,
            vocab,
            seq_out: n,
            seq_in: n,
        }
    }
}

impl<R: Runtime> Device<R> {
    /// Launches the log-prob forward on device buffers (`h`'s length
    /// `h_len`), returning `(logprob, lse)` without waiting: with CubeCL's
    /// matmul, the logits a chunk at a time through it (see
    /// `launch_linear_logprob_chunked`); with coopc's,
    /// [`linear_logprob_forward_blocked`] and [`linear_logprob_merge`];
    /// scored rows that skip rows of h, [`linear_logprob_forward`].
    pub fn launch_linear_logprob(
        &self,
        [h, w, targets]: [&Handle; 3],
        h_len: usize,
        s: LogprobShape,
    ) -> (Handle, Handle) {
        if s.seq_out == s.seq_in && self.chunked_logits() {
            return self.launch_linear_logprob_chunked([h, w, targets], h_len, s);
        }
        let (out, lse) = (self.output(s.n), self.output(s.n));
        if s.seq_out == s.seq_in {
            let (n, u) = (s.n, |v: usize| v as u32);
            let (span, splits) = forward_splits(n, s.vocab);
            let (pm, ps, tl) = (
                self.output(splits * n),
                self.output(splits * n),
                self.output(n),
            );
            linear_logprob_forward_blocked::launch::<R>(
                self.client(),
                CubeCount::Static(u(splits), u(n).div_ceil(64), 1),
                CubeDim::new_2d(16, 16),
                arg(h, h_len),
                arg(w, s.vocab * s.d),
                arg(targets, n),
                arg(&pm, splits * n),
                arg(&ps, splits * n),
                arg(&tl, n),
                u(n),
                u(s.d),
                u(s.vocab),
                u(span),
            );
            linear_logprob_merge::launch::<R>(
                self.client(),
                cubes(n.div_ceil(256)),
                CubeDim::new_1d(256),
                arg(targets, n),
                arg(&pm, splits * n),
                arg(&ps, splits * n),
                arg(&tl, n),
                arg(&out, n),
                arg(&lse, n),
                u(n),
                u(s.vocab),
                u(splits),
            );
            self.note_memory();
            return (out, lse);
        }
        linear_logprob_forward::launch::<R>(
            self.client(),
            tiles(s.n),
            CubeDim::new_2d(LOGPROB_TILE as u32, LOGPROB_TILE as u32),
            arg(h, h_len),
            arg(w, s.vocab * s.d),
            arg(targets, s.n),
            arg(&out, s.n),
            arg(&lse, s.n),
            s.n as u32,
            s.d as u32,
            s.vocab as u32,
            s.seq_out as u32,
            s.seq_in as u32,
            LOGPROB_TILE,
        );
        (out, lse)
    }

    /// Whether the log-prob's logits are CubeCL's products a chunk at a
    /// time: with CubeCL's matmul, where it reads views of buffers (each
    /// chunk of W is one); else coopc's fused kernels.
    fn chunked_logits(&self) -> bool {
        self.matmul.is_cubecl() && self.matmul_views
    }

    /// Launches the logits of vocabulary rows `v0..v0 + vc` for the tokens
    /// (the rows of h), `z = h [n, d] · W[v0..v0 + vc]ᵀ [d, vc]`, into the
    /// first `n · vc` elements of `z`, with the device's matmul; `ops` are
    /// h, W and z, each with its length.
    fn launch_chunk_logits(
        &self,
        ops: [(&Handle, usize); 3],
        s: LogprobShape,
        v0: usize,
        vc: usize,
    ) {
        let shape = MatmulShape {
            batch: 1,
            m: s.n,
            k: s.d,
            n: vc,
            trans_a: false,
            trans_b: true,
        };
        self.product_into(ops, shape, [0, v0 * s.d, 0], false);
    }

    /// [`Device::launch_linear_logprob`] with the logits computed by the
    /// device's matmul, a chunk of the vocabulary at a time
    /// (`linear_logprob::device_chunk` rows, the backward's scratch):
    /// [`linear_logprob_fold`] folds each chunk's logits into a running
    /// (max, Σexp) per token and [`linear_logprob_merge`] turns it into the
    /// log-sum-exp and log-probs.
    fn launch_linear_logprob_chunked(
        &self,
        [h, w, targets]: [&Handle; 3],
        h_len: usize,
        s: LogprobShape,
    ) -> (Handle, Handle) {
        let (n, d, vocab, u) = (s.n, s.d, s.vocab, |v: usize| v as u32);
        let chunk = device_chunk(n, vocab);
        let (run_m, run_s, tl) = (self.output(n), self.output(n), self.output(n));
        let z = self.output(n * chunk);
        for v0 in (0..vocab).step_by(chunk) {
            let vc = chunk.min(vocab - v0);
            self.launch_chunk_logits([(h, h_len), (w, vocab * d), (&z, n * chunk)], s, v0, vc);
            linear_logprob_fold::launch::<R>(
                self.client(),
                cubes(n),
                CubeDim::new_1d(FOLD_BLOCK as u32),
                arg(&z, n * chunk),
                arg(targets, n),
                arg(&run_m, n),
                arg(&run_s, n),
                arg(&tl, n),
                u(n),
                u(vocab),
                u(v0),
                u(vc),
                FOLD_BLOCK,
            );
            self.note_memory();
        }
        // The merge of one "split": lse = m + ln s, the target's log-prob.
        let (out, lse) = (self.output(n), self.output(n));
        linear_logprob_merge::launch::<R>(
            self.client(),
            cubes(n.div_ceil(256)),
            CubeDim::new_1d(256),
            arg(targets, n),
            arg(&run_m, n),
            arg(&run_s, n),
            arg(&tl, n),
            arg(&out, n),
            arg(&lse, n),
            u(n),
            u(vocab),
            1,
        );
        (out, lse)
    }

    /// The gradients `(dh, dW)` of `Σ_t grad[t] · logprob[t]` that
    /// `want` asks for (`[dh, dW]`), from the forward's `lse`, a chunk of
    /// the vocabulary at a time: the chunk's coefficients `C [T, chunk]`
    /// (the only vocabulary-sized scratch, `device_chunk` rows) come from
    /// CubeCL's product of the chunk's logits and [`linear_logprob_scale`],
    /// or from [`linear_logprob_coefficients`] with coopc's matmul; then
    /// matrix products add `C · W[chunk]` to dh and write `Cᵀ · h` into the
    /// chunk's rows of dW.
    pub fn launch_linear_logprob_backward(
        &self,
        [h, w, targets, lse, grad]: [&Handle; 5],
        s: LogprobShape,
        want: [bool; 2],
        chunk: usize,
    ) -> [Option<Handle>; 2] {
        let (n, d, vocab) = (s.n, s.d, s.vocab);
        let chunk = chunk.clamp(1, vocab.max(1));
        let c = self.output(n * chunk);
        let dh = want[0].then(|| self.output(n * d));
        let dw = want[1].then(|| self.output(vocab * d));
        let u = |v: usize| v as u32;
        let mut v0 = 0;
        while v0 < vocab {
            let vc = chunk.min(vocab - v0);
            if self.chunked_logits() {
                // The chunk's logits into C, then its epilogue.
                self.launch_chunk_logits([(h, n * d), (w, vocab * d), (&c, n * chunk)], s, v0, vc);
                linear_logprob_scale::launch::<R>(
                    self.client(),
                    cubes((n * vc).div_ceil(256)),
                    CubeDim::new_1d(256),
                    arg(&c, n * chunk),
                    arg(targets, n),
                    arg(lse, n),
                    arg(grad, n),
                    u(n),
                    u(vocab),
                    u(v0),
                    u(vc),
                );
            } else {
                linear_logprob_coefficients::launch::<R>(
                    self.client(),
                    CubeCount::Static(u(vc).div_ceil(64), u(n).div_ceil(64), 1),
                    CubeDim::new_2d(16, 16),
                    arg(h, n * d),
                    arg(w, vocab * d),
                    arg(targets, n),
                    arg(lse, n),
                    arg(grad, n),
                    arg(&c, n * chunk),
                    u(n),
                    u(d),
                    u(vocab),
                    u(v0),
                    u(vc),
                );
            }
            self.chunk_gradients([h, w, &c], [&dh, &dw], s, chunk, v0, vc);
            v0 += vc;
        }
        [dh, dw]
    }

    /// From one chunk's coefficients `c [n, vc]` (vocabulary rows from
    /// `v0`, in a buffer of `n · chunk`), adds `C · W[chunk]` to dh (which
    /// it writes on the first chunk) and writes `Cᵀ · h` into the chunk's
    /// rows of dW, for the gradients asked for.
    fn chunk_gradients(
        &self,
        [h, w, c]: [&Handle; 3],
        [dh, dw]: [&Option<Handle>; 2],
        s: LogprobShape,
        chunk: usize,
        v0: usize,
        vc: usize,
    ) {
        let (n, d, vocab) = (s.n, s.d, s.vocab);
        if let Some(dh) = dh {
            // dh (+)= C [n, vc] · W[v0..v0 + vc] [vc, d].
            let shape = MatmulShape {
                batch: 1,
                m: n,
                k: vc,
                n: d,
                trans_a: false,
                trans_b: false,
            };
            let ops = [(c, n * chunk), (w, vocab * d), (dh, n * d)];
            self.product_into(ops, shape, [0, v0 * d, 0], v0 > 0);
        }
        if let Some(dw) = dw {
            // dW[v0..v0 + vc] = Cᵀ [vc, n] · h [n, d].
            let shape = MatmulShape {
                batch: 1,
                m: vc,
                k: n,
                n: d,
                trans_a: true,
                trans_b: false,
            };
            let ops = [(c, n * chunk), (h, n * d), (dw, vocab * d)];
            self.product_into(ops, shape, [0, 0, v0 * d], false);
        }
        self.note_memory();
    }

    /// Launches the linear entropy of the rows of `h [n, d]` under `w
    /// [vocab, d]` on device buffers, returning `(entropy, lse)` without
    /// waiting: each chunk's logits (`chunk` vocabulary rows; the
    /// executor's choice is `linear_logprob::device_chunk`) by the device's
    /// matmul, folded by [`linear_entropy_fold`] into a running (max, Σexp,
    /// Σexp·logit) per token, so no `[n, vocab]` buffer is held.
    pub fn launch_linear_entropy(
        &self,
        [h, w]: [&Handle; 2],
        s: LogprobShape,
        chunk: usize,
    ) -> (Handle, Handle) {
        let (n, d, vocab, u) = (s.n, s.d, s.vocab, |v: usize| v as u32);
        let chunk = chunk.clamp(1, vocab.max(1));
        let (run_m, run_s, run_u) = (self.output(n), self.output(n), self.output(n));
        let (entropy, lse) = (self.output(n), self.output(n));
        let z = self.output(n * chunk);
        for v0 in (0..vocab).step_by(chunk) {
            let vc = chunk.min(vocab - v0);
            self.launch_chunk_logits([(h, n * d), (w, vocab * d), (&z, n * chunk)], s, v0, vc);
            linear_entropy_fold::launch::<R>(
                self.client(),
                cubes(n),
                CubeDim::new_1d(FOLD_BLOCK as u32),
                arg(&z, n * chunk),
                arg(&run_m, n),
                arg(&run_s, n),
                arg(&run_u, n),
                arg(&lse, n),
                arg(&entropy, n),
                u(n),
                u(v0),
                u(vc),
                FOLD_BLOCK,
            );
            self.note_memory();
        }
        (entropy, lse)
    }

    /// The gradients `(dh, dW)` of `Σ_t grad[t] · entropy[t]` that `want`
    /// asks for, from the forward's `entropy` and `lse`, a chunk of the
    /// vocabulary at a time: the chunk's logits by the device's matmul,
    /// turned into `C = −g p (log p + H)` by [`linear_entropy_scale`], then
    /// the products of [`Device::launch_linear_logprob_backward`].
    pub fn launch_linear_entropy_backward(
        &self,
        [h, w, entropy, lse, grad]: [&Handle; 5],
        s: LogprobShape,
        want: [bool; 2],
        chunk: usize,
    ) -> [Option<Handle>; 2] {
        let (n, d, vocab) = (s.n, s.d, s.vocab);
        let chunk = chunk.clamp(1, vocab.max(1));
        let c = self.output(n * chunk);
        let dh = want[0].then(|| self.output(n * d));
        let dw = want[1].then(|| self.output(vocab * d));
        let u = |v: usize| v as u32;
        for v0 in (0..vocab).step_by(chunk) {
            let vc = chunk.min(vocab - v0);
            self.launch_chunk_logits([(h, n * d), (w, vocab * d), (&c, n * chunk)], s, v0, vc);
            linear_entropy_scale::launch::<R>(
                self.client(),
                cubes((n * vc).div_ceil(256)),
                CubeDim::new_1d(256),
                arg(&c, n * chunk),
                arg(lse, n),
                arg(entropy, n),
                arg(grad, n),
                u(n),
                u(vc),
            );
            self.chunk_gradients([h, w, &c], [&dh, &dw], s, chunk, v0, vc);
        }
        [dh, dw]
    }

    /// `(entropy [T], lse [T])` of the logits `h Wᵀ` (`h [T, d]`, `w [V,
    /// d]` row-major), by [`Device::launch_linear_entropy`] in chunks of
    /// `chunk` vocabulary rows.
    pub fn linear_entropy(
        &self,
        h: &[f32],
        w: &[f32],
        d: usize,
        chunk: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        let (t, vocab) = (h.len() / d.max(1), w.len() / d.max(1));
        if d == 0 || h.len() != t * d || w.len() != vocab * d || t == 0 || vocab == 0 {
            return Err(DeviceError::Device(format!(
                "linear_entropy: h has {} elements, w {}, d = {d}",
                h.len(),
                w.len()
            )));
        }
        let (hh, wh) = (self.upload(h), self.upload(w));
        let s = LogprobShape::tokens(t, d, vocab);
        let (e, lse) = self.launch_linear_entropy([&hh, &wh], s, chunk);
        Ok((self.download(e, t)?, self.download(lse, t)?))
    }

    /// `(dh [T, d], dW [V, d])` of `Σ_t grad[t] · entropy[t]`, by
    /// [`Device::launch_linear_entropy`] and
    /// [`Device::launch_linear_entropy_backward`], in chunks of `chunk`
    /// vocabulary rows.
    pub fn linear_entropy_backward(
        &self,
        h: &[f32],
        w: &[f32],
        grad: &[f32],
        d: usize,
        chunk: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        let (t, vocab) = (grad.len(), w.len() / d.max(1));
        if d == 0 || h.len() != t * d || w.len() != vocab * d || t == 0 || vocab == 0 {
            return Err(DeviceError::Device(format!(
                "linear_entropy_backward: h has {} elements, w {}, grad {}, d = {d}",
                h.len(),
                w.len(),
                grad.len()
            )));
        }
        let (hh, wh, gh) = (self.upload(h), self.upload(w), self.upload(grad));
        let s = LogprobShape::tokens(t, d, vocab);
        let (e, lse) = self.launch_linear_entropy([&hh, &wh], s, chunk);
        let ops = [&hh, &wh, &e, &lse, &gh];
        let [dh, dw] = self.launch_linear_entropy_backward(ops, s, [true, true], chunk);
        let (dh, dw) = (dh.expect("asked"), dw.expect("asked"));
        Ok((self.download(dh, t * d)?, self.download(dw, vocab * d)?))
    }

    /// `(logprob [T], lse [T])` of `targets` under the logits `h Wᵀ`, with
    /// `h [T, d]` and `w [V, d]` row-major and targets whole numbers in
    /// `0..V`, computed by [`linear_logprob_forward`].
    pub fn linear_logprob(
        &self,
        h: &[f32],
        w: &[f32],
        targets: &[f32],
        d: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        let t = targets.len();
        let vocab = w.len() / d.max(1);
        if h.len() != t * d || w.len() != vocab * d || t == 0 || vocab == 0 {
            return Err(DeviceError::Device(format!(
                "linear_logprob: h has {} elements, w {}, {t} targets, d = {d}",
                h.len(),
                w.len()
            )));
        }
        check_targets("linear_logprob", targets, vocab)?;
        let (hh, wh, th) = (self.upload(h), self.upload(w), self.upload(targets));
        let shape = LogprobShape::tokens(t, d, vocab);
        let (lp, lse) = self.launch_linear_logprob([&hh, &wh, &th], h.len(), shape);
        Ok((self.download(lp, t)?, self.download(lse, t)?))
    }

    /// `(dh [T, d], dW [V, d])` of `Σ_t grad[t] · logprob[t]`, from the
    /// forward's `lse`, by [`Device::launch_linear_logprob_backward`] in
    /// chunks of `chunk` vocabulary rows (the executor's choice is
    /// `linear_logprob::device_chunk`).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_logprob_backward(
        &self,
        h: &[f32],
        w: &[f32],
        targets: &[f32],
        lse: &[f32],
        grad: &[f32],
        d: usize,
        chunk: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        let t = targets.len();
        let vocab = w.len() / d.max(1);
        if h.len() != t * d || lse.len() != t || grad.len() != t || t == 0 || vocab == 0 {
            return Err(DeviceError::Device(format!(
                "linear_logprob_backward: h has {} elements, w {}, {t} targets, lse {}, grad {}, d = {d}",
                h.len(),
                w.len(),
                lse.len(),
                grad.len()
            )));
        }
        check_targets("linear_logprob_backward", targets, vocab)?;
        let up = |x: &[f32]| self.upload(x);
        let (hh, wh, th, lh, gh) = (up(h), up(w), up(targets), up(lse), up(grad));
        let shape = LogprobShape::tokens(t, d, vocab);
        let ops = [&hh, &wh, &th, &lh, &gh];
        let [dh, dw] = self.launch_linear_logprob_backward(ops, shape, [true, true], chunk);
        let (dh, dw) = (dh.expect("asked"), dw.expect("asked"));
        Ok((self.download(dh, t * d)?, self.download(dw, vocab * d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_chunks_dw_kernel_is_named_where_it_differs() {
        // 32,000 = 7 · 4,096 + 3,328: every chunk on 128 × 128 blocks.
        let p = blocked_products(4096, 1024, 32_000, 4096);
        assert_eq!(p, (Product::Wide, Product::Wide, None));
        // 4,196 = 4,096 + 100: the last chunk's 100 rows on 64 × 64 blocks.
        let p = blocked_products(4096, 1024, 4196, 4096);
        assert_eq!(p, (Product::Wide, Product::Wide, Some(Product::Blocked)));
        // 4,106 rows: the last 10 on the thin kernel.
        assert_eq!(
            blocked_products(64, 256, 4106, 4096).2,
            Some(Product::Tiled)
        );
        // One chunk (vocab ≤ chunk): nothing more.
        assert_eq!(
            blocked_products(64, 256, 100, 4096),
            (Product::Blocked, Product::Blocked, None)
        );
    }
}
