//! Fused linear log-prob, forward: `logprob[t] = h[t]·W[y_t] − logsumexp_v
//! h[t]·W[v]` for hidden states `h [T, d]`, an LM head `W [V, d]` and
//! targets `y [T]`, without ever materialising the `[T, V]` logits; and its
//! backward, `dh` and `dW` of `Σ_t g[t] · logprob[t]`, recomputing the
//! logits from the forward's per-token log-sum-exp.
//!
//! All three kernels walk the `[T, V]` logits in `TILE × TILE` tiles, each
//! computed as a tiled matrix product (`TILE`-wide panels of h and W staged
//! in shared memory, as `matmul_tiled` does), so a row of W is read once
//! per `TILE` tokens and a row of h once per `TILE` vocabulary rows:
//!
//! - forward: a cube per `TILE` tokens sweeps the vocabulary tile by tile,
//!   folding each tile's logits into an online (max, Σexp) per token;
//! - backward `dh`: a cube per `TILE` tokens sweeps the vocabulary, turns
//!   each tile into `C = g (1[v = y] − p)` and adds `C · W[tile]` to its
//!   rows of dh;
//! - backward `dW`: a cube per `TILE` vocabulary rows sweeps the tokens and
//!   adds `Cᵀ · h[tile]` to its rows of dW.
//!
//! Memory is `O(T)` beyond the operands whatever the vocabulary. Written
//! for correctness first: `TILE` is 16 and each unit computes one logit of
//! a tile (no register blocking), so the kernels run at about the rate of
//! the tiled matmul, not of a tuned GEMM.
//!
//! The device executor runs the IR's `linear_logprob` op (and a matched
//! log-softmax-of-logits subgraph) with the forward kernel, and each
//! `linear_logprob_grad` op with the forward (for the log-sum-exp) and one
//! backward kernel. A target outside `0..V` makes its row NaN.

use crate::device::{arg, Device, DeviceError};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// Tile edge: cubes are `TILE × TILE` units.
pub const LOGPROB_TILE: usize = 16;

/// `a[at]` when `inside`, else 0 (`at` is not read then).
#[cube]
fn load_or_zero(a: &Array<f32>, at: usize, inside: bool) -> f32 {
    let v = a[select(inside, at, 0usize)];
    select(inside, v, f32::new(0.0))
}

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

/// Zeroes this unit's columns `tx, tx + tile, …` of the `d`-long row of
/// `out` starting at `row` (when `ok`).
#[cube]
fn zero_columns(out: &mut Array<f32>, row: usize, ok: bool, d: usize, #[comptime] tile: usize) {
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < d {
        if ok {
            out[row + j] = zero;
        }
        j += tile;
    }
}

/// Adds `Σ_c c_tile[ty, c] · src[first + c]` to this unit's columns of the
/// `d`-long row of `out` starting at `row` (when `ok`): the product of a
/// `tile × tile` coefficient tile (in shared memory) with the `tile` rows
/// of `src` (`[rows, d]`) from row `first`, rows past `rows` read as 0.
#[cube]
#[allow(clippy::too_many_arguments)]
fn add_tile_product(
    out: &mut Array<f32>,
    row: usize,
    ok: bool,
    coef: &SharedMemory<f32>,
    src: &Array<f32>,
    first: usize,
    rows: usize,
    d: usize,
    #[comptime] tile: usize,
) {
    let ty = UNIT_POS_Y as usize;
    // A run-time zero (mutable variables must start from run-time values).
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < d {
        let mut acc = zero;
        for c in 0..tile {
            let r = first + c;
            acc += coef[ty * tile + c] * load_or_zero(src, r * d + j, r < rows);
        }
        if ok {
            out[row + j] += acc;
        }
        j += tile;
    }
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

/// `dh[t] = Σ_v C[t, v] · W[v]` with `C = g[t] (1[v = y_t] − exp(h[t]·W[v]
/// − lse[t]))`. Launch as [`linear_logprob_forward`]; `h` is `[T, d]`.
/// Unit `(ty, tx)` owns columns `tx, tx + tile, …` of token `ty`'s row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_backward_h(
    h: &Array<f32>,
    w: &Array<f32>,
    targets: &Array<f32>,
    lse: &Array<f32>,
    grad: &Array<f32>,
    dh: &mut Array<f32>,
    n_tokens: u32,
    d: u32,
    vocab: u32,
    #[comptime] tile: usize,
) {
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let (n, d, vocab) = (n_tokens as usize, d as usize, vocab as usize);
    let tok = CUBE_POS_X as usize * tile + ty;
    let tok_ok = tok < n;
    let tc = select(tok_ok, tok, 0usize);
    let (inside, target) = target_id(targets[tc], vocab);
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    // A target outside 0..vocab makes the row NaN, as in the forward.
    let (l, g) = (lse[tc], select(inside, grad[tc], zero / zero));
    let mut sx = SharedMemory::<f32>::new(tile * tile);
    let mut sw = SharedMemory::<f32>::new(tile * tile);
    let mut sc = SharedMemory::<f32>::new(tile * tile);
    zero_columns(dh, tok * d, tok_ok, d, tile);
    let mut v0 = (UNIT_POS_X * 0) as usize;
    while v0 < vocab {
        let w_row = v0 + ty;
        let z = tile_logit(
            h,
            tc * d,
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
        let hit = select(v == target, f32::new(1.0), zero);
        sc[ty * tile + tx] = select(v < vocab, g * (hit - (z - l).exp()), zero);
        sync_cube();
        add_tile_product(dh, tok * d, tok_ok, &sc, w, v0, vocab, d, tile);
        sync_cube();
        v0 += tile;
    }
}

/// `dW[v] = Σ_t C[t, v] · h[t]` (C as in [`linear_logprob_backward_h`]).
/// Launch with `CubeDim(tile, tile)` and `ceil(V / tile)` cubes; unit
/// `(ty, tx)` scores vocabulary row `tile · cube + ty` against token `tx`
/// of each tile of tokens and owns columns `tx, tx + tile, …` of its row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_backward_w(
    h: &Array<f32>,
    w: &Array<f32>,
    targets: &Array<f32>,
    lse: &Array<f32>,
    grad: &Array<f32>,
    dw: &mut Array<f32>,
    n_tokens: u32,
    d: u32,
    vocab: u32,
    #[comptime] tile: usize,
) {
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let (n, d, vocab) = (n_tokens as usize, d as usize, vocab as usize);
    let v = CUBE_POS_X as usize * tile + ty;
    let v_ok = v < vocab;
    let vc = select(v_ok, v, 0usize);
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    let mut sx = SharedMemory::<f32>::new(tile * tile);
    let mut sw = SharedMemory::<f32>::new(tile * tile);
    let mut sc = SharedMemory::<f32>::new(tile * tile);
    zero_columns(dw, v * d, v_ok, d, tile);
    let mut t0 = (UNIT_POS_X * 0) as usize;
    while t0 < n {
        // Row ty of the h panel is token t0 + ty; the logit of unit
        // (ty, tx) is W[v] · h[t0 + tx].
        let h_row = t0 + ty;
        let z = tile_logit(
            w,
            vc * d,
            v_ok,
            h,
            h_row * d,
            h_row < n,
            d,
            &mut sx,
            &mut sw,
            tile,
        );
        let tok = t0 + tx;
        let tk = select(tok < n, tok, 0usize);
        let (inside, target) = target_id(targets[tk], vocab);
        // A target outside 0..vocab makes its token's share NaN.
        let g = select(inside, grad[tk], zero / zero);
        let hit = select(target == v, f32::new(1.0), zero);
        sc[ty * tile + tx] = select(tok < n, g * (hit - (z - lse[tk]).exp()), zero);
        sync_cube();
        add_tile_product(dw, v * d, v_ok, &sc, h, t0, n, d, tile);
        sync_cube();
        t0 += tile;
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

/// Sizes of one linear log-prob: `n` scored rows, `d` features, `vocab`
/// rows of `w`; scored row `t` reads row `(t / seq_out) · seq_in + t %
/// seq_out` of `h` (`seq_out = seq_in = n`: row t).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogprobShape {
    pub n: usize,
    pub d: usize,
    pub vocab: usize,
    pub seq_out: usize,
    pub seq_in: usize,
}

impl<R: Runtime> Device<R> {
    /// Launches [`linear_logprob_forward`] on device buffers (`h`'s length
    /// `h_len`): `(logprob, lse)`.
    pub(crate) fn launch_linear_logprob(
        &self,
        [h, w, targets]: [&Handle; 3],
        h_len: usize,
        s: LogprobShape,
    ) -> (Handle, Handle) {
        let (out, lse) = (self.output(s.n), self.output(s.n));
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

    /// Launches [`linear_logprob_backward_w`] (`weights`) or
    /// [`linear_logprob_backward_h`] on device buffers, `h` being `[n, d]`.
    pub(crate) fn launch_linear_logprob_backward(
        &self,
        [h, w, targets, lse, grad]: [&Handle; 5],
        s: LogprobShape,
        weights: bool,
    ) -> Handle {
        let (n, d, vocab) = (s.n, s.d, s.vocab);
        let a = |x: &Handle, len: usize| arg::<R>(x, len);
        if weights {
            let dw = self.output(vocab * d);
            linear_logprob_backward_w::launch::<R>(
                self.client(),
                tiles(vocab),
                CubeDim::new_2d(LOGPROB_TILE as u32, LOGPROB_TILE as u32),
                a(h, n * d),
                a(w, vocab * d),
                a(targets, n),
                a(lse, n),
                a(grad, n),
                a(&dw, vocab * d),
                n as u32,
                d as u32,
                vocab as u32,
                LOGPROB_TILE,
            );
            dw
        } else {
            let dh = self.output(n * d);
            linear_logprob_backward_h::launch::<R>(
                self.client(),
                tiles(n),
                CubeDim::new_2d(LOGPROB_TILE as u32, LOGPROB_TILE as u32),
                a(h, n * d),
                a(w, vocab * d),
                a(targets, n),
                a(lse, n),
                a(grad, n),
                a(&dh, n * d),
                n as u32,
                d as u32,
                vocab as u32,
                LOGPROB_TILE,
            );
            dh
        }
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
        let shape = LogprobShape {
            n: t,
            d,
            vocab,
            seq_out: t,
            seq_in: t,
        };
        let (lp, lse) = self.launch_linear_logprob([&hh, &wh, &th], h.len(), shape);
        Ok((self.download(lp, t)?, self.download(lse, t)?))
    }

    /// `(dh [T, d], dW [V, d])` of `Σ_t grad[t] · logprob[t]`, from the
    /// forward's `lse`, by [`linear_logprob_backward_h`] and
    /// [`linear_logprob_backward_w`].
    pub fn linear_logprob_backward(
        &self,
        h: &[f32],
        w: &[f32],
        targets: &[f32],
        lse: &[f32],
        grad: &[f32],
        d: usize,
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
        let shape = LogprobShape {
            n: t,
            d,
            vocab,
            seq_out: t,
            seq_in: t,
        };
        let ops = [&hh, &wh, &th, &lh, &gh];
        let dh = self.launch_linear_logprob_backward(ops, shape, false);
        let dw = self.launch_linear_logprob_backward(ops, shape, true);
        Ok((self.download(dh, t * d)?, self.download(dw, vocab * d)?))
    }
}
